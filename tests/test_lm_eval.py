"""lm-evaluation-harness against a live server with nothing but the server: `local-completions`
finds /tokenizer_info and /tokenize (its default `tokenizer_backend=auto`) and needs no
tokenizer of its own, for a log-likelihood task and a generation task written here;
`local-chat-completions` with the chat template applied by the server. The log-likelihoods
lm-eval reports equal the server's own echo log-probabilities of the same continuations."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.server_utils import API_KEY, SMOL_NAMES

pytest_plugins = ("tests.server_fixtures",)
lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin"], "answer": 0,
     "target": "Paris"},
    {"question": "Two plus two equals", "choices": ["seven", "four"], "answer": 1,
     "target": "four"},
    {"question": "The colour of the sky on a clear day is", "choices": ["blue", "green"],
     "answer": 0, "target": "blue"},
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              "test_split: test\ndoc_to_text: \"{{question}}\"\n")
    (folder / "choice.yaml").write_text(
        "task: tova_choice\n" + common + "output_type: multiple_choice\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "generate.yaml").write_text(
        "task: tova_generate\n" + common + "output_type: generate_until\n"
        "doc_to_target: \"{{target}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


def evaluate(tasks_folder: Path, model: str, names: list[str], base_url: str, **options):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model, model_args={"model": SMOL_NAMES[0], "base_url": base_url,
                                 "num_concurrent": 2, "max_retries": 1},
        tasks=names, task_manager=TaskManager(include_path=str(tasks_folder)),
        log_samples=True, **options)


def echo_loglikelihood(url: str, context: str, continuation: str) -> float:
    """Sum of the server's prompt log-probs over the continuation's tokens."""
    def tokens(text: str) -> list[int]:
        body = {"prompt": text, "add_special_tokens": False}
        return httpx.post(f"{url}/tokenize", json=body).json()["tokens"]

    ctx, cont = tokens(context), tokens(continuation)
    body = {"model": SMOL_NAMES[0], "prompt": ctx + cont, "max_tokens": 0, "echo": True,
            "logprobs": 0, "temperature": 0}
    out = httpx.post(f"{url}/v1/completions", json=body, timeout=60,
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()
    return sum(out["choices"][0]["logprobs"]["token_logprobs"][len(ctx):])


def test_local_completions_with_the_servers_tokenizer(smol_server, tasks, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    results = evaluate(tasks, "local-completions", ["tova_choice", "tova_generate"],
                       f"{smol_server.url}/v1/completions")
    choice = results["results"]["tova_choice"]
    assert 0 <= choice["acc,none"] <= 1
    assert "exact_match,none" in results["results"]["tova_generate"]
    for sample in results["samples"]["tova_choice"]:
        doc = sample["doc"]
        # One response per choice: [(log-likelihood, is_greedy)].
        for [(loglikelihood, _)], option in zip(sample["resps"], doc["choices"], strict=True):
            # lm-eval joins them with its target delimiter, a space.
            expected = echo_loglikelihood(smol_server.url, doc["question"], " " + option)
            assert loglikelihood == pytest.approx(expected, abs=2e-3)
    generated = [s["resps"][0][0] for s in results["samples"]["tova_generate"]]
    assert len(generated) == len(DOCS) and all(isinstance(g, str) for g in generated)


def test_local_chat_completions_uses_the_servers_chat_template(smol_server, tasks, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    results = evaluate(tasks, "local-chat-completions", ["tova_generate"],
                       f"{smol_server.url}/v1/chat/completions", apply_chat_template=True)
    samples = results["samples"]["tova_generate"]
    assert len(samples) == len(DOCS)
    # What lm-eval sent is the message list itself: the template is the server's.
    argument = samples[0]["arguments"][0][0]
    text = argument[0] if isinstance(argument, tuple) else argument
    assert json.loads(text) == [{"role": "user", "content": DOCS[0]["question"]}]
    assert "exact_match,none" in results["results"]["tova_generate"]
