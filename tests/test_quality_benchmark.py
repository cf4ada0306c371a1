"""The quality benchmark (benchmarks/quality.py) end to end on a tiny random llama: the outputs'
structure, and perplexities checked against an independent reference: `full` (and every policy
whose state holds the whole window) must equal the full-context perplexity that transformers
computes on the same weights."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models

from benchmarks import quality
from benchmarks.quality_data import FILLER, passkey_found, passkey_prompts, ppl_windows
from tests.conftest import save_tiny_model

WINDOW = 48
SIZES = (8, 16, WINDOW)
TEXT = Path(__file__).parents[1] / "benchmarks" / "data" / "pride_and_prejudice.txt"
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per character (78 ids, within the tiny model's 96), with a chat template."""
    chars = sorted(set(string.ascii_letters + string.digits + " .,:;!?'\"-()\n"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    # BPE without merges splits text into characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices: thread start-up costs more than it saves, and CI cores may be shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """The conftest tiny llama (same seed, same weights) with a tokenizer and chat template."""
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny-chat"))
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "austen.txt"
    path.write_text(TEXT.read_text()[:4000])
    return path


@pytest.fixture(scope="module")
def full_run(chat_model, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    argv = [
        "--model", str(chat_model), "--text", str(text_file), "--dtype", "float64",
        "--window", str(WINDOW), "--windows", "2", "--state-sizes", *map(str, SIZES),
        "--chunk-sizes", "1", "4", "window", "--chunk-state-sizes", "8", "16",
        "--passkey-lengths", "400", "--passkey-depths", "0.1", "0.9",
        "--passkey-max-tokens", "4", "--out-dir", str(out),
    ]  # fmt: skip
    return quality.main(argv), out


def reference_ppl(model_dir: Path, windows: list[list[int]]) -> float:
    """Full-context perplexity from transformers' forward, float64."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            logp = model(ids).logits[0, :-1].log_softmax(-1)
            nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += len(window) - 1
    return math.exp(nll / count)


def ppl_table(report) -> dict[tuple[str, int], float]:
    return {(r["policy"], r["state_size"]): r["ppl"] for r in report["perplexity"]}


def test_writes_every_output(full_run):
    report, out = full_run
    for name in ("quality.json", "quality.md", "jobs.jsonl", "perplexity.png", "passkey.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "chunks.png").exists()
    saved = json.loads((out / "quality.json").read_text())
    assert saved["checks"] == json.loads(json.dumps(report["checks"]))
    text = (out / "quality.md").read_text()
    for heading in ("### Perplexity", "### Prefill chunk size", "### Passkey", "### Jobs"):
        assert heading in text
    # One line per job, each with the results of all its requests.
    lines = (out / "jobs.jsonl").read_text().splitlines()
    assert len(lines) == len(report["jobs"]) == 5 + 3  # five policies' main jobs, three chunks
    # Each job records the torch it ran with; the report names those, not the reader's.
    assert {job["torch"] for job in report["jobs"]} == {torch.__version__}
    assert f"torch {torch.__version__};" in text


def test_report_structure(full_run):
    report, _ = full_run
    table = ppl_table(report)
    assert set(table) == {("full", WINDOW)} | {
        (p, s) for p in ("tova", "h2o", "sink", "window") for s in SIZES
    }
    for row in report["perplexity"]:
        assert row["tokens"] == 2 * (WINDOW - 1)
        assert len(row["window_ppl"]) == 2
        assert 1 < row["ppl"] < 1e4
        assert set(row["state"]) >= {"first_token", "recent_share", "median_age"}
    window_row = next(r for r in report["perplexity"] if r["policy"] == "window")
    assert window_row["state"]["recent_share"] == 1.0  # a window keeps exactly the latest
    assert {(r["chunk"], r["state_size"]) for r in report["chunks"]} == {
        (c, s) for c in (1, 4, WINDOW) for s in (8, 16)
    }
    assert all(r["prefill_s"] > 0 and not r["shared_batch"] for r in report["chunks"])
    assert set(report["checks"]["ordering"]) == set(SIZES)
    assert report["settings"]["parts"] == ["ppl", "chunks", "passkey"]


def test_full_equals_transformers_full_context(full_run, chat_model, text_file):
    report, _ = full_run
    ids = char_tokenizer().encode(text_file.read_text(), add_special_tokens=False)
    expected = reference_ppl(chat_model, ppl_windows(ids, WINDOW, 2))
    table = ppl_table(report)
    assert table[("full", WINDOW)] == pytest.approx(expected, rel=1e-9)
    # A state as large as the window never evicts, whatever the policy; a whole-window
    # prefill chunk predicts every token before evicting anything.
    for policy in ("tova", "h2o", "sink", "window"):
        assert table[(policy, WINDOW)] == pytest.approx(expected, rel=1e-9)
    whole = [r for r in report["chunks"] if r["chunk"] == WINDOW]
    assert [r["ppl"] for r in whole] == pytest.approx([expected] * 2, rel=1e-9)


def test_small_states_evict_and_chunk_one_is_per_token_tova(full_run):
    report, _ = full_run
    table = ppl_table(report)
    assert table[("window", 8)] != pytest.approx(table[("full", WINDOW)], rel=1e-6)
    # The chunk trade-off's one-token chunks are the perplexity part's TOVA, run apart.
    for row in (r for r in report["chunks"] if r["chunk"] == 1):
        assert row["ppl"] == pytest.approx(table[("tova", row["state_size"])], rel=1e-9)


def test_passkey_results(full_run):
    report, _ = full_run
    trials = report["passkey"]["trials"]
    # 2 prompts x (4 evicting policies x 3 state sizes + full)
    assert len(trials) == 2 * (4 * len(SIZES) + 1)
    for t in trials:
        assert t["prompt_tokens"] <= 400 - 4
        assert t["correct"] == passkey_found(t["key"], t["answer"])
    assert {r["n"] for r in report["passkey"]["accuracy"]} == {2}
    assert len(report["passkey"]["cells"]) == 2 * (4 * len(SIZES) + 1)


def test_passkey_prompts_place_the_key():
    tokenizer = char_tokenizer()
    filler = len(tokenizer.encode(FILLER, add_special_tokens=False))
    prompts = passkey_prompts(tokenizer, [900], [0.0, 0.5, 1.0], 2, 8, seed=3)
    assert len({p.key for p in prompts}) == 6
    for p in prompts:
        assert 900 - 8 - filler < len(p.ids) <= 900 - 8
        text = tokenizer.decode(p.ids)
        assert text.startswith("<s>user: ") and text.endswith("assistant: The pass key is")
        sentence = FILLER.split(".")[0].strip()
        before = text[: text.index(p.key)].count(sentence)
        assert before == round(p.depth * text.count(sentence))  # the key sits at its depth
    assert passkey_found("12345", " 12,345.") and not passkey_found("12345", " 1234")


def test_token_ids_two_devices_and_resume(full_run, tiny_llama, text_file, tmp_path, monkeypatch):
    """A tokenizer-less model takes token ids (passkey is skipped), jobs spread over two
    worker processes agree with the single-process run, chunk 1 falls back to the perplexity
    part, and --resume reruns nothing."""
    report, _ = full_run
    ids = char_tokenizer().encode(text_file.read_text(), add_special_tokens=False)
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(ids))
    base = [
        "--model", str(tiny_llama), "--token-ids", str(ids_file), "--dtype", "float64",
        "--window", str(WINDOW), "--windows", "2", "--state-sizes", "8", "16",
        "--policies", "full", "tova", "--parts", "ppl,chunks,passkey", "--no-plots",
        "--chunk-sizes", "4", "--chunk-state-sizes", "8",
    ]  # fmt: skip
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the spawned workers
    split = quality.main([*base, "--device", "cpu", "cpu", "--out-dir", str(tmp_path / "a")])
    assert split["settings"]["parts"] == ["ppl", "chunks"]
    assert not split["passkey"]["trials"]
    table = ppl_table(report)
    for key, ppl in ppl_table(split).items():
        assert ppl == pytest.approx(table[key], rel=1e-9)
    # Chunk 1 not run apart: the table takes it from the perplexity part, marked as such.
    chunks = {(r["chunk"], r["shared_batch"]): r["ppl"] for r in split["chunks"]}
    assert set(chunks) == {(4, False), (1, True)}
    assert chunks[(1, True)] == table[("tova", 8)]

    def must_not_run(*args):
        raise AssertionError("a job ran again despite --resume")

    monkeypatch.setattr(quality, "run_job", must_not_run)
    resumed = quality.main(
        [*base, "--out-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "jobs.jsonl")]
    )
    assert ppl_table(resumed) == ppl_table(split)


def test_policy_variants(full_run, chat_model, text_file, tmp_path):
    """Variants reach the engine: a TOVA protecting its whole state (recent=1.0) is a plain
    window and shares the TOVA engine (recency is per request); a window protecting its first
    four tokens is `sink`."""
    report, _ = full_run
    argv = [
        "--model", str(chat_model), "--text", str(text_file), "--dtype", "float64",
        "--window", str(WINDOW), "--windows", "2", "--state-sizes", "8", "16", "--parts", "ppl",
        "--policies", "tova", "tova:recent=1.0", "window:first=4", "--no-plots",
        "--out-dir", str(tmp_path),
    ]  # fmt: skip
    variants = quality.main(argv)
    assert {j["name"] for j in variants["jobs"]} == {"main-tova-c1", "main-window:first=4-c1"}
    table, expected = ppl_table(variants), ppl_table(report)
    for size in (8, 16):
        assert table[("tova", size)] == pytest.approx(expected[("tova", size)], rel=1e-9)
        assert table[("tova:recent=1.0", size)] == pytest.approx(expected[("window", size)])
        assert table[("window:first=4", size)] == pytest.approx(expected[("sink", size)])
    assert table[("tova:recent=1.0", 8)] != pytest.approx(table[("tova", 8)], rel=1e-6)
    assert "| tova:recent=1.0 |" in (tmp_path / "quality.md").read_text()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lru", "one of"),
        ("tova:depth=3", "options are"),
        ("tova:recent=1.5", "fraction"),
        ("tova:recent=-2", ">= 0"),
        ("window:recent=0.5", "already keeps the latest"),
        ("full:recent=4", "never evicts"),
    ],
)
def test_rejects_bad_policy_variants(spec, message):
    with pytest.raises(ValueError, match=message):
        quality.Variant.parse(spec)
    with pytest.raises(SystemExit):
        quality.parse_args(["--policies", spec])


def test_rejects_bad_arguments(tiny_llama, tmp_path):
    with pytest.raises(SystemExit):
        quality.parse_args(["--parts", "ppl,speed"])
    with pytest.raises(ValueError, match="windows"):
        ppl_windows(list(range(100)), 48, 3)
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(list(range(3, 90))))
    with pytest.raises(ValueError, match="--state-sizes"):
        quality.main(
            ["--model", str(tiny_llama), "--token-ids", str(ids_file), "--state-sizes", "4096"]
        )


def test_passkey_retained_counts_only_keys_the_full_context_finds():
    from types import SimpleNamespace

    from benchmarks.quality import passkey_summary

    def item(policy: str, size: int, trial: int, correct: bool):
        task = SimpleNamespace(
            policy=policy, state_size=size, label={"length": 100, "depth": 0.5, "trial": trial}
        )
        return task, {"correct": correct}

    items = [
        item("full", 100, 0, True), item("full", 100, 1, False), item("full", 100, 2, True),
        # tova finds one of the two keys the full context finds, plus one it misses
        item("tova", 8, 0, True), item("tova", 8, 1, True), item("tova", 8, 2, False),
    ]
    summary = passkey_summary(items)
    assert summary["retained"] == [
        {"policy": "tova", "state_size": 8, "accuracy": 0.5, "n": 2}
    ]
    tova = [r for r in summary["accuracy"] if r["policy"] == "tova"]
    assert tova == [{"policy": "tova", "state_size": 8, "accuracy": 2 / 3, "n": 3}]
