"""Tensor parallelism on one host: the same model over 1 and N GPUs, in one run.

For each `--tp-sizes` entry the engine is built with `tensor_parallel_size=N` (dummy weights
with the real shapes, bf16, CUDA graphs over the fused kernels) and measured three ways:
  * the sequences that fit: `max_num_seqs="auto"` over the memory left after the weights
    (or `--state-gib-per-gpu` of state per GPU, the same on every N: N GPUs hold N times the
    sequences, each GPU a 1/N share of every sequence's heads);
  * one wave of that many requests, `--input-len` random prompt tokens -> `--output-len`
    tokens each (greedy, ignore_eos): output tok/s;
  * decode step time at each `--step-batches` size with a full state (eviction every step),
    against the roofline of one GPU's share (its weights and state bytes over the copy rate
    measured in the same run); the all-reduce traffic per step is printed beside it.

    python benchmarks/tensor_parallel.py --model benchmarks/configs/llama-3.1-8b.json \\
        --tp-sizes 1 2 --state-gib-per-gpu 8 --output-len 512 --out tp.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_roofline import start, timed
from benchmarks.roofline import decode_step_cost, measure_ceilings
from tova_engine import SamplingParams
from tova_engine.config import EngineConfig
from tova_engine.execution.memory import weight_bytes
from tova_engine.frontend.llm_engine import LLMEngine
from tova_engine.loader.hf_folder import read_json
from tova_engine.model.config import ModelConfig
from tova_engine.model.registry import config_from_hf
from tova_engine.state.kv_state import KVState


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="benchmarks/configs/llama-3.1-8b.json")
    p.add_argument("--tp-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--policy", default="tova")
    p.add_argument("--state-size", type=int, default=512)
    p.add_argument("--state-gib-per-gpu", type=float, default=None,
                   help="state memory per GPU (default: whatever fits, max_num_seqs=auto)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--step-batches", type=int, nargs="*", default=[128, 256])
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per batch size")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script (gloo)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def state_bytes_per_gpu(config: ModelConfig, args, size: int) -> int:
    """One sequence's state on one GPU: its share of the KV heads."""
    dtype = getattr(torch, args.dtype)
    return KVState.bytes_per_sequence(config, args.state_size, dtype) // size


def build(args, size: int, max_num_seqs) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=args.model, load_format="dummy", dtype=args.dtype, device=args.device,
        policy=args.policy, state_size=args.state_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=8192, prefill_chunk_size=args.state_size,
        tensor_parallel_size=size,
    ))


def wave(engine: LLMEngine, count: int, args) -> dict:
    rng = random.Random(0)
    vocab = engine.info.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            output_kind="final")
    sync(args)
    started = time.perf_counter()
    for i in range(count):
        prompt = [rng.randrange(3, vocab) for _ in range(args.input_len)]
        engine.add_request(f"wave-{i}", prompt, params)
    generated = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            generated += len(output.outputs[0].token_ids)
    sync(args)
    seconds = time.perf_counter() - started
    return {"requests": count, "generated": generated, "seconds": seconds,
            "output_tok_s": generated / seconds}


def step_row(engine: LLMEngine, batch: int, args, ceilings, size: int) -> dict:
    start(engine, batch, args.state_size, max_tokens=args.steps + 12)
    for _ in range(5):
        engine.step()
    wall = statistics.median(timed(engine) for _ in range(args.steps))
    while engine.has_unfinished_requests():
        engine.step()
    whole = engine.core.executor.model_config
    # One GPU's share: 1/N of the heads, the MLP and the vocabulary (padded up).
    share = dataclasses.replace(
        engine.core.executor.worker.model.local, vocab_size=-(-whole.vocab_size // size))
    element = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    cost = decode_step_cost(share, batch, args.state_size, element, ceilings)
    # Per step: two all-reduces of the hidden states per layer (bf16), one of the attention
    # sums per layer (float32, [batch, S+1]), one gather of the logits.
    reduced = whole.num_layers * batch * (2 * whole.hidden_size * element
                                          + (args.state_size + 1) * 4)
    return {"batch": batch, "step_ms": 1e3 * wall, "roofline_ms": 1e3 * cost.limit_s,
            "of_roofline": cost.limit_s / wall, "bound": cost.bound,
            "all_reduce_mb_per_step": reduced / 1e6 if size > 1 else 0.0}


def measure(args, size: int, ceilings) -> dict:
    whole = config_from_hf(read_json(Path(args.model)))
    per_seq = state_bytes_per_gpu(whole, args, size)
    if args.state_gib_per_gpu:
        fit = int(args.state_gib_per_gpu * 2**30 // per_seq)
        seqs = max(fit, *args.step_batches)
    else:
        seqs = "auto"
    print(f"TP={size}: building (max_num_seqs={seqs})", flush=True)
    started = time.perf_counter()
    engine = build(args, size, seqs)
    built_s = time.perf_counter() - started
    slots = engine.config.max_num_seqs
    fit = slots if seqs == "auto" else fit
    print(f"TP={size}: built in {built_s:.0f} s, {slots} slots; a wave of {fit}", flush=True)
    result = {"tp": size, "max_num_seqs": slots, "sequences_that_fit": fit,
              "state_mib_per_sequence_per_gpu": per_seq / 2**20,
              "weights_gib_per_gpu": weight_bytes(engine.core.executor.worker.model) / 2**30,
              "build_s": built_s}
    try:
        result["wave"] = wave(engine, fit, args)
        result["steps"] = [step_row(engine, b, args, ceilings, size)
                           for b in args.step_batches if b <= slots]
        report(result, args)  # before the ranks stop
    finally:
        engine.core.close()
        del engine
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return result


def report(r: dict, args) -> None:
    w = r["wave"]
    print(f"TP={r['tp']}: {r['sequences_that_fit']} sequences "
          f"({r['state_mib_per_sequence_per_gpu']:.1f} MiB each per GPU), built in "
          f"{r['build_s']:.0f} s, weights {r['weights_gib_per_gpu']:.1f} GiB per GPU; "
          f"wave {w['requests']} x {args.input_len}->{args.output_len}: "
          f"{w['output_tok_s']:,.0f} output tok/s ({w['seconds']:.1f} s)", flush=True)
    for s in r["steps"]:
        print(f"  batch {s['batch']}: decode step {s['step_ms']:.2f} ms, roofline "
              f"{s['roofline_ms']:.2f} ms ({s['of_roofline']:.0%}, {s['bound']}-bound), "
              f"all-reduce {s['all_reduce_mb_per_step']:.1f} MB/step", flush=True)


def main() -> None:
    args = parse_args()
    # The engine's start-up log (state size, graph capture) shows where a long build goes.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ceilings = measure_ceilings(torch.device(args.device))
    gpus = args.device == "cuda" and torch.cuda.device_count()
    machine = f"{torch.cuda.get_device_name()} x{gpus}" if gpus else "CPU (dry run)"
    print(f"{machine}; ceilings: copy "
          f"{ceilings.copy_bytes_per_s / 1e12:.2f} TB/s, matmul "
          f"{ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s; model {args.model}, "
          f"{args.policy} S={args.state_size}", flush=True)
    results = []
    for size in args.tp_sizes:
        results.append(measure(args, size, ceilings))
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "ceilings":
                                                  ceilings._asdict(), "results": results},
                                                 indent=2))
    print("\n| TP | sequences | output tok/s | " + " | ".join(
        f"step ms @{b} (% roofline)" for b in args.step_batches) + " |")
    print("|---|---|---|" + "---|" * len(args.step_batches))
    for r in results:
        cells = {s["batch"]: f"{s['step_ms']:.2f} ({s['of_roofline']:.0%})" for s in r["steps"]}
        print(f"| {r['tp']} | {r['sequences_that_fit']} | {r['wave']['output_tok_s']:,.0f} | "
              + " | ".join(cells.get(b, "n/a") for b in args.step_batches) + " |")


if __name__ == "__main__":
    main()
