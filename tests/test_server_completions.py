"""/v1/completions against a live server, through the official OpenAI client."""

from __future__ import annotations

import httpx
import pytest

from tests.server_utils import API_KEY, SMOL_NAMES, auth_headers

pytest_plugins = ("tests.server_fixtures",)

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0.0}


def count_tokens(url: str, text: str) -> int:
    response = httpx.post(f"{url}/tokenize", json={"prompt": text})
    return response.json()["count"]


def greedy(client, prompt=PROMPT, max_tokens: int = 8, **kwargs):
    return client.completions.create(model=SMOL_NAMES[0], prompt=prompt, max_tokens=max_tokens,
                                     **GREEDY, **kwargs)


def test_text_prompt(client, smol_server):
    out = greedy(client, extra_body={"ignore_eos": True})
    assert out.id.startswith("cmpl-") and out.object == "text_completion"
    assert out.model == SMOL_NAMES[0] and out.created > 0
    [choice] = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert out.usage.prompt_tokens == count_tokens(smol_server.url, PROMPT)
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_token_id_prompt_matches_text_prompt(client, smol_server):
    ids = httpx.post(f"{smol_server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert greedy(client, prompt=ids).choices[0].text == greedy(client).choices[0].text


def test_batch_of_prompts_with_n(client):
    prompts = [PROMPT, "Once upon a time"]
    out = greedy(client, prompt=prompts, n=2, max_tokens=4, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 16
    # Choices are numbered prompt_index * n + choice: 0-1 continue the first prompt.
    texts = [greedy(client, prompt=p, max_tokens=4).choices[0].text for p in prompts]
    assert [c.text for c in out.choices] == [texts[0], texts[0], texts[1], texts[1]]


def test_batch_of_token_id_lists(client, smol_server):
    ids = httpx.post(f"{smol_server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    out = greedy(client, prompt=[ids, ids[:3]], max_tokens=2)
    assert len(out.choices) == 2
    assert out.usage.prompt_tokens == len(ids) + 3


def test_model_alias_is_reported_back(client):
    out = client.completions.create(model=SMOL_NAMES[1], prompt=PROMPT, max_tokens=1)
    assert out.model == SMOL_NAMES[1]


def test_stream_with_usage_matches_full_response(client):
    full = greedy(client, max_tokens=10, extra_body={"ignore_eos": True})
    chunks = list(greedy(client, max_tokens=10, stream=True,
                         stream_options={"include_usage": True},
                         extra_body={"ignore_eos": True}))
    *content, last = chunks
    assert "".join(c.choices[0].text for c in content) == full.choices[0].text
    assert all(c.usage is None for c in content) and {c.id for c in chunks} == {chunks[0].id}
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    # One chunk per token while the client keeps up; a stream that falls behind gets the
    # tokens that piled up in one chunk.
    assert 1 <= len(content) <= 10
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_of_a_batch_interleaves_choices(client):
    prompts = [PROMPT, "Once upon a time"]
    chunks = list(greedy(client, prompt=prompts, n=2, max_tokens=3, stream=True,
                         extra_body={"ignore_eos": True}))
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i)
             for i in range(4)}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert len(chunks) <= 12 and finishes == ["length"] * 4
    full = greedy(client, prompt=prompts, n=2, max_tokens=3, extra_body={"ignore_eos": True})
    assert [texts[c.index] for c in full.choices] == [c.text for c in full.choices]


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(greedy(client, max_tokens=3, stream=True, extra_body={"ignore_eos": True}))
    assert 1 <= len(chunks) <= 3 and all(c.choices for c in chunks)


def test_seed_reproducible_and_n_distinct(client):
    def sample(seed: int):
        out = client.completions.create(model=SMOL_NAMES[0], prompt=PROMPT, max_tokens=12,
                                        temperature=1.5, n=3, seed=seed,
                                        extra_body={"ignore_eos": True})
        return [c.text for c in out.choices]

    first = sample(1234)
    assert sample(1234) == first
    assert len(set(first)) > 1  # choices draw from their own generators
    assert sample(99) != first


def generated_ids(client, prompt=PROMPT, max_tokens: int = 6) -> list[int]:
    out = greedy(client, prompt=prompt, max_tokens=max_tokens, logprobs=0,
                 extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    return [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]


def test_stop_string(client):
    text = greedy(client, max_tokens=8, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[3:6]  # a string the greedy output certainly contains
    out = greedy(client, max_tokens=8, stop=[stop, "zzzz"], extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text == text[: text.index(stop)]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop


def test_stop_token_ids(client):
    ids = generated_ids(client)
    out = greedy(client, max_tokens=6, extra_body={"stop_token_ids": [ids[2]]})
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == ids[2]
    assert out.usage.completion_tokens == ids.index(ids[2]) + 1


def test_logprobs_legacy_format(client):
    out = greedy(client, max_tokens=6, logprobs=2, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 2 <= len(top) <= 3
        # Greedy: the chosen token is the most likely one.
        assert top[token] == pytest.approx(logprob) and logprob == pytest.approx(max(top.values()))


def test_echo_with_zero_max_tokens_scores_the_prompt(client, smol_server):
    """The loglikelihood path of lm-evaluation-harness: the logprobs that echo reports for
    prompt tokens equal those the model gave when it generated the same tokens."""
    prompt = httpx.post(f"{smol_server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    generated = greedy(client, max_tokens=5, logprobs=0, extra_body={"ignore_eos": True})
    gen_ids = generated_ids(client, max_tokens=5)
    out = client.completions.create(model=SMOL_NAMES[0], prompt=prompt + gen_ids, max_tokens=0,
                                    echo=True, logprobs=1)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text == PROMPT + generated.choices[0].text
    assert out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == len(prompt) + 5 == len(lp.tokens)
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    gen_lp = generated.choices[0].logprobs
    assert lp.tokens[-5:] == gen_lp.tokens
    assert lp.token_logprobs[-5:] == pytest.approx(gen_lp.token_logprobs, abs=2e-3)


def test_echo_prepends_prompt_to_generation(client):
    plain = greedy(client, max_tokens=3, extra_body={"ignore_eos": True}).choices[0].text
    echoed = greedy(client, max_tokens=3, echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPT + plain
    streamed = greedy(client, max_tokens=3, echo=True, stream=True,
                      extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + plain


def test_top_k_one_is_greedy_and_penalties_are_accepted(client):
    reference = greedy(client, max_tokens=6).choices[0].text
    out = client.completions.create(model=SMOL_NAMES[0], prompt=PROMPT, max_tokens=6,
                                    temperature=1.0, extra_body={"top_k": 1})
    assert out.choices[0].text == reference
    penalised = client.completions.create(
        model=SMOL_NAMES[0], prompt=PROMPT, max_tokens=6, temperature=0, presence_penalty=1.0,
        frequency_penalty=1.0, extra_body={"repetition_penalty": 1.3, "min_p": 0.05},
    )
    assert penalised.usage.completion_tokens <= 6


def test_min_tokens_holds_off_eos_and_stop_strings(client):
    out = client.completions.create(model=SMOL_NAMES[0], prompt="Hi", max_tokens=40,
                                    temperature=0, extra_body={"min_tokens": 40})
    assert out.usage.completion_tokens == 40
    text = greedy(client, max_tokens=8, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[3:6]
    early = greedy(client, max_tokens=8, stop=[stop]).usage.completion_tokens
    held = greedy(client, max_tokens=8, stop=[stop], extra_body={"min_tokens": 6})
    assert early < 6 <= held.usage.completion_tokens


def test_logit_bias_forces_a_token(client, smol_server):
    [token] = httpx.post(f"{smol_server.url}/tokenize",
                         json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"]
    out = greedy(client, max_tokens=3, logit_bias={str(token): 100},
                 extra_body={"ignore_eos": True})
    assert out.choices[0].text == " banana" * 3


def test_state_size_and_return_state(client, smol_server):
    prompt = " ".join(["word"] * 60)
    n_prompt = count_tokens(smol_server.url, prompt)
    out = greedy(client, prompt=prompt, max_tokens=4,
                 extra_body={"state_size": 32, "return_state": True, "ignore_eos": True})
    positions = out.choices[0].model_extra["state_positions"]
    assert len(positions) == 30  # one list per layer of SmolLM2-135M
    seen = n_prompt + 4 - 1  # the last sampled token never entered the state
    for layer in positions:
        assert len(layer) == 32 and len(set(layer)) == 32
        assert all(0 <= p < seen for p in layer)
    plain = greedy(client, prompt=prompt, max_tokens=1)
    assert "state_positions" not in plain.choices[0].model_extra


def test_return_state_in_stream(client):
    chunks = list(greedy(client, max_tokens=2, stream=True,
                         extra_body={"return_state": True, "ignore_eos": True}))
    assert "state_positions" not in chunks[0].choices[0].model_extra
    assert len(chunks[-1].choices[0].model_extra["state_positions"]) == 30


def test_models_version_tokenize_detokenize(client, smol_server):
    models = client.models.list()
    assert [m.id for m in models.data] == list(SMOL_NAMES)
    assert client.models.retrieve(SMOL_NAMES[1]).id == SMOL_NAMES[1]
    assert models.data[0].model_extra["max_model_len"] == 8192
    version = httpx.get(f"{smol_server.url}/version").json()["version"]
    assert version
    tokens = httpx.post(f"{smol_server.url}/tokenize",
                        json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
    text = httpx.post(f"{smol_server.url}/detokenize", json={"tokens": tokens["tokens"]})
    assert text.json() == {"prompt": PROMPT}


def test_startup_logs_resolved_config_and_state_memory(smol_server):
    log = smol_server.log()
    assert "resolved config" in log and '"state_size": 128' in log
    assert '"api_key": "set"' in log and API_KEY not in log
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x 2 (K, V) x 128 entries x 4 bytes.
    assert "5.62 MiB per request" in log


def test_health_and_metrics_need_no_key(smol_server):
    assert httpx.get(f"{smol_server.url}/health").status_code == 200
    assert httpx.get(f"{smol_server.url}/metrics").status_code == 200
    assert httpx.get(f"{smol_server.url}/v1/models", headers=auth_headers()).status_code == 200


def test_protect_recent_per_request_keeps_the_latest_positions(client, smol_server):
    ids = httpx.post(f"{smol_server.url}/tokenize", json={"prompt": PROMPT * 8}).json()["tokens"]
    out = client.completions.create(
        model=SMOL_NAMES[0], prompt=ids, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True, "return_state": True, "protect_recent": 0.25,
                    "state_size": 16})
    fed = len(ids) + 6 - 1
    latest = set(range(fed - 4, fed))  # a quarter of 16
    layers = out.choices[0].model_extra["state_positions"]
    assert layers and all(latest <= set(layer) and len(layer) == 16 for layer in layers)
