"""benchmarks/serve.py against the live server: exact token counts, a complete summary."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.server_utils import API_KEY, REPO

pytest_plugins = ("tests.server_fixtures",)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "benchmarks" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_benchmark_at_fixed_concurrency(bench, smol_server, tmp_path, capsys):
    result_file = tmp_path / "result.json"
    summary = bench.main([
        "--base-url", smol_server.url, "--api-key", API_KEY, "--num-prompts", "6",
        "--max-concurrency", "3", "--input-len", "16", "--output-len", "4",
        "--result-file", str(result_file),
    ])
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["total_input_tokens"] == 6 * 16
    assert summary["total_output_tokens"] == 6 * 4
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(summary[key]) == {"mean", "median", "p99"}
        assert 0 < summary[key]["mean"] <= summary["e2el_ms"]["p99"]
    assert summary["server"]["decode_step_s"] > 0
    assert set(summary["http_overhead"]) == {
        "added_vs_decode_step_ms", "added_vs_decode_step_ratio", "http_only_ms",
        "http_only_ratio"}
    assert json.loads(result_file.read_text())["completed"] == 6
    table = capsys.readouterr().out
    assert "Mean TTFT (ms)" in table and "P99 ITL (ms)" in table


def test_benchmark_with_text_prompts_and_request_rate(bench, smol_server, tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession "
                    "of a good fortune, must be in want of a wife. " * 4)
    summary = bench.main([
        "--base-url", smol_server.url, "--api-key", API_KEY, "--num-prompts", "4",
        "--request-rate", "20", "--input-len", "24", "--output-len", "3",
        "--dataset-path", str(text), "--seed", "1",
    ])
    assert summary["completed"] == 4
    assert summary["total_input_tokens"] == 4 * 24 and summary["total_output_tokens"] == 12


def test_benchmark_spread_over_client_processes(smol_server, tmp_path):
    """Run as a script (spawned client processes import it as the main module): every
    request is counted once, whichever process sent it."""
    import subprocess

    result_file = tmp_path / "split.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve.py"), "--base-url", smol_server.url,
         "--api-key", API_KEY, "--num-prompts", "5", "--max-concurrency", "4",
         "--input-len", "8", "--output-len", "3", "--client-processes", "2",
         "--result-file", str(result_file)],
        check=True, capture_output=True, timeout=300,
    )
    summary = json.loads(result_file.read_text())
    assert summary["completed"] == 5 and summary["failed"] == 0
    assert summary["total_input_tokens"] == 5 * 8 and summary["total_output_tokens"] == 5 * 3
    assert summary["duration_s"] > 0 and summary["client_cpu_s"] > 0


def test_shared_prefix_prompts(bench):
    """--shared-prefix-len: request i starts with prefix i mod --num-prefixes, then its own
    --input-len tokens."""
    import argparse
    import random

    args = argparse.Namespace(num_prompts=7, input_len=5, shared_prefix_len=12, num_prefixes=3)
    tokens = list(range(1000))
    prompts = bench.make_prompts(tokens, args, random.Random(0))
    assert [len(p) for p in prompts] == [17] * 7
    heads = [tuple(p[:12]) for p in prompts]
    assert len(set(heads)) == 3
    assert all(heads[i] == heads[i % 3] for i in range(7))
    assert len({tuple(p[12:]) for p in prompts}) == 7


def test_conversation_turns_resend_the_turn_before(bench):
    """--turns: turn k's prompt is turn k-1's, then --output-len answer tokens and
    --input-len new ones."""
    import argparse
    import itertools
    import random

    args = argparse.Namespace(num_prompts=3, input_len=5, output_len=4, shared_prefix_len=6,
                              num_prefixes=1, turns=4)
    conversations = bench.make_conversations(list(range(1000)), args, random.Random(0))
    assert len(conversations) == 3
    for pieces in conversations:
        prompts = list(bench.turn_prompts(pieces))
        assert [len(p) for p in prompts] == [11, 20, 29, 38]
        for before, after in itertools.pairwise(prompts):
            assert after[: len(before)] == before


def test_benchmark_runs_conversations_turn_after_turn(bench, smol_server, capsys):
    summary = bench.main([
        "--base-url", smol_server.url, "--api-key", API_KEY, "--num-prompts", "2",
        "--max-concurrency", "2", "--input-len", "8", "--output-len", "3", "--turns", "3",
    ])
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["total_input_tokens"] == 2 * (8 + 19 + 30)
    turns = summary["turns"]["by_turn"]
    assert [t["requests"] for t in turns] == [2, 2, 2]
    assert [t["prompt_tokens"] for t in turns] == [8, 19, 30]
    assert summary["turns"]["last_over_second_ttft"] > 0
    assert "Median TTFT, turn 3 (ms)" in capsys.readouterr().out


def test_histogram_quantile_over_the_run(bench):
    """The q-quantile of what a histogram saw between two scrapes: the upper bound of the
    bucket it falls in, counted from the buckets' deltas only."""
    def scrape(counts: dict[str, float]) -> dict:
        return {("x_bucket", (("le", le), ("phase", "decode"))): v for le, v in counts.items()}

    before = scrape({"0.01": 5, "0.1": 5, "1.0": 5, "+Inf": 5})  # 5 old, all under 10 ms
    after = scrape({"0.01": 95, "0.1": 104, "1.0": 105, "+Inf": 105})  # 90, 9, 1 new
    assert bench.quantile_delta(before, after, "x", 0.5, phase="decode") == 0.01
    assert bench.quantile_delta(before, after, "x", 0.99, phase="decode") == 0.1
    assert bench.quantile_delta(before, after, "x", 1.0, phase="decode") == 1.0
    assert bench.quantile_delta(before, before, "x", 0.99, phase="decode") is None
    assert bench.quantile_delta(before, after, "x", 0.99, phase="prefill") is None
