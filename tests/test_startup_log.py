"""Start-up says what it is doing: weight loading logs its progress and its time."""

from __future__ import annotations

import re

import pytest
import torch

from tova_engine.loader import load_source, progress
from tova_engine.model.llama import LlamaModel

# The tiny checkpoint: 2 layers of 9 tensors, the embedding, the final norm and the head.
TENSORS = 21


def load(folder) -> None:
    source = load_source(folder, dtype=torch.float32)
    model = LlamaModel.empty(source.config, torch.device("cpu"), torch.float32)
    model.load_hf_weights(source.weights)


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tova_engine"]


def test_weight_loading_logs_start_progress_and_time(tiny_llama, monkeypatch, caplog):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)  # a tiny model loads in milliseconds
    with caplog.at_level("INFO", logger="tova_engine"):
        load(tiny_llama)
    lines = messages(caplog)
    assert re.fullmatch(rf"loading weights from {tiny_llama}: {TENSORS} tensors, [\d.]+ kB",
                        lines[0])
    steps = [line for line in lines if re.search(rf": \d+/{TENSORS} tensors, ", line)]
    # At most one line per 10% of the bytes, at least a few for a 21-tensor model.
    assert 3 <= len(steps) <= 10
    counts = [int(re.search(r": (\d+)/", line).group(1)) for line in steps]
    assert counts == sorted(counts)
    assert re.fullmatch(
        rf"loaded {TENSORS} tensors \([\d.]+ kB\) from {tiny_llama} in \d+\.\d s", lines[-1]
    )


def test_a_fast_load_logs_only_its_start_and_end(tiny_llama, caplog):
    with caplog.at_level("INFO", logger="tova_engine"):
        load(tiny_llama)
    lines = [line for line in messages(caplog) if "weights" in line or "tensors" in line]
    assert len(lines) == 2 and lines[-1].startswith(f"loaded {TENSORS} tensors")


def test_the_plan_matches_what_is_loaded(tiny_llama):
    source = load_source(tiny_llama, dtype=torch.float64)
    tensors = list(source.weights)
    plan = source.weights.plan
    assert plan.num_tensors == len(tensors) == TENSORS
    assert plan.num_bytes == sum(t.numel() * 8 for _, t in tensors)


@pytest.mark.parametrize(
    ("done", "total", "text"),
    [(1_234_000_000, 16_100_000_000, "1.2/16.1 GB"), (150_000, 296_200, "150.0/296.2 kB"),
     (5_000_000, 538_100_000, "5.0/538.1 MB")],
)
def test_amounts_share_the_totals_unit(done, total, text):
    assert progress._amount(done, total, of=True) == text
