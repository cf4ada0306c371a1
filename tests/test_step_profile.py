"""benchmarks/step_profile.py end to end on a tiny model (CPU)."""

from __future__ import annotations

import argparse

from benchmarks.step_profile import StepTimer, measure


def args_for(model) -> argparse.Namespace:
    return argparse.Namespace(
        model=str(model), load_format="auto", device="cpu", dtype="float32", kernels="auto",
        state_size=16, decodes=3, prompts=2, input_len=24, repeats=2, top=5,
    )


def test_measures_every_step_kind_and_prints_the_profile(tiny_llama, capsys):
    results = measure(args_for(tiny_llama))
    assert set(results) == {"decode only", "prefill only", "mixed"}
    assert all(len(times) == 2 and min(times) > 0 for times in results.values())
    printed = capsys.readouterr().out
    assert "prefill only  median" in printed and "Self CPU time total" in printed


def test_decode_phase_has_every_sequence_past_its_prompt(tiny_llama):
    timer = StepTimer(args_for(tiny_llama))
    timer.start_decodes()
    requests = timer.requests
    assert len(requests) == 3 and timer.engine.num_waiting == 0
    assert all(r.state.sequences[0].token_ids for r in requests)
    timer.drain()
    assert not timer.engine.has_unfinished_requests() and timer.engine.slots_used == 0
