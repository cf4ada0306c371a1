"""Prefill against the matmul rate: prompt tokens per second of steps that prefill a token
budget of prompt chunks, alone and beside running decodes, and the share of the measured bf16
matmul rate that the step's FLOPs reach.

    python benchmarks/prefill_step.py --model benchmarks/configs/llama-3.1-8b.json \\
        --chunks 512 2048 --tokens 2048 8192 --decodes 0 256 --out prefill.json

Prompts of `--prompt-len` tokens keep arriving so that about `tokens / chunk` of them prefill
at once. `aligned`: they arrive together, so every step's chunks are at the same point of
their prompts; `staggered`: one arrives per step at first, then as many as finished, so
a step's chunks are at different points (what serving sees). Each step also decodes
`decodes` running sequences whose state is full. The FLOPs counted are the weight
matmuls (2 x parameters per token) plus attention over the entries each token sees.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_flags import add_engine_flags, sync
from benchmarks.roofline import measure_ceilings, weight_counts
from tova_engine import SamplingParams
from tova_engine.config import EngineConfig
from tova_engine.frontend.llm_engine import LLMEngine


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_flags(p)
    p.add_argument("--state-size", type=int, default=512)
    p.add_argument("--chunks", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192],
                   help="prompt tokens per step")
    p.add_argument("--decodes", type=int, nargs="+", default=[0, 256])
    p.add_argument("--prompt-len", type=int, default=2176)
    p.add_argument("--modes", nargs="+", default=["aligned", "staggered"],
                   choices=("aligned", "staggered"))
    p.add_argument("--pack", nargs="+", default=["on"], choices=("on", "off"),
                   help="a step's eager forwards as one (on, the engine's way) or one per part")
    p.add_argument("--max-prefill-graphs", type=int, default=16)
    p.add_argument("--steps", type=int, default=12, help="timed steps per row")
    p.add_argument("--target-itl-ms", type=float, default=0,
                   help="the engine's prefill pacing (0: off, so each row's budget holds)")
    p.add_argument("--profile", default=None,
                   help="append a torch.profiler table of one staggered step with decodes here")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


class Rig:
    """One engine with a chunk size; rows vary the step's budget and the decodes."""

    def __init__(self, args: argparse.Namespace, chunk: int) -> None:
        self.args = args
        most_prompts = -(-max(args.tokens) // min(chunk, args.prompt_len)) + 1
        self.engine = LLMEngine(EngineConfig(
            model=args.model, load_format=args.load_format, device=args.device,
            dtype=args.dtype, policy=args.policy, quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
            state_size=args.state_size,
            max_num_seqs=max(args.decodes) + most_prompts, prefill_chunk_size=chunk,
            max_num_batched_tokens=max(args.tokens) + max(args.decodes),
            prefix_cache_bytes=0, target_itl_ms=args.target_itl_ms,
            max_prefill_graphs=args.max_prefill_graphs,
            cuda_graph_batch_sizes=(max(args.decodes),) if max(args.decodes) else None,
        ), stats_callback=self._count)
        self.chunk = chunk
        self.rng = random.Random(0)
        self.vocab = self.engine.info.vocab_size
        self.prompt_tokens = 0
        self.steps = 0
        self.added = 0
        self.decoding: list[str] = []

    def _count(self, stats) -> None:
        self.prompt_tokens += stats.prompt_tokens
        self.steps += 1

    def add(self, prompt_len: int, max_tokens: int) -> str:
        self.added += 1
        request_id = f"r{self.added}"
        prompt = [self.rng.randrange(3, self.vocab) for _ in range(prompt_len)]
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                output_kind="final")
        self.engine.add_request(request_id, prompt, params)
        return request_id

    def prefilling(self) -> int:
        return sum(1 for r in self.engine.core.scheduler.running if r.prefilling) + len(
            self.engine.core.scheduler.waiting)

    def set_decodes(self, count: int) -> None:
        """`count` sequences decoding with a full state, with tokens to spare."""
        for request_id in self.decoding:
            self.engine.abort_request(request_id)
        limit = self.engine.max_model_len - self.args.state_size
        self.decoding = [self.add(self.args.state_size, limit) for _ in range(count)]
        while self.prefilling():
            self.engine.step()
        self.engine.step()

    def row(self, tokens: int, mode: str, pack: bool) -> dict:
        engine = self.engine
        engine.core.executor.worker.runner.pack_steps = pack
        engine.core.scheduler.token_budget = tokens + len(self.decoding)
        in_flight = max(1, tokens // min(self.chunk, self.args.prompt_len))
        if mode == "aligned":
            def top_up() -> None:
                if self.prefilling() == 0:
                    for _ in range(in_flight):
                        self.add(self.args.prompt_len, 1)
        else:
            ramp = [0]  # one new prompt a step at first, so prompts sit at different points

            def top_up() -> None:
                ramp[0] += 1
                missing = in_flight - self.prefilling()
                for _ in range(missing if ramp[0] > in_flight else min(missing, 1)):
                    self.add(self.args.prompt_len, 1)
        for _ in range(2 * in_flight + 8):  # warm up: stagger, capture graphs
            top_up()
            engine.step()
        sync()
        self.prompt_tokens = self.steps = 0
        begin = time.perf_counter()
        step_ms = []
        for _ in range(self.args.steps):
            top_up()
            started = time.perf_counter()
            engine.step()
            sync()
            step_ms.append(1e3 * (time.perf_counter() - started))
        elapsed = time.perf_counter() - begin
        return {"prompt_tokens": self.prompt_tokens, "steps": self.args.steps,
                "seconds": elapsed, "step_ms_median": statistics.median(step_ms),
                "prefill_tokens_per_s": self.prompt_tokens / elapsed}

    def profile_step(self, path: str, label: str) -> None:
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        sync()
        with profile(activities=activities) as prof:
            self.engine.step()
            sync()
        device_us = sum(e.self_device_time_total for e in prof.key_averages())
        with open(path, "a") as f:
            f.write(f"\n# {label}: device busy {device_us / 1e3:.1f} ms\n")
            f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25))
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    def drain(self) -> None:
        for request in list(self.engine.core.scheduler.running) + list(
                self.engine.core.scheduler.waiting):
            if request.request_id not in self.decoding:
                self.engine.abort_request(request.request_id)
        while self.prefilling():
            self.engine.step()


def step_flops(config, prompt_tokens: int, decodes: int, steps: int, chunk: int,
               state_size: int) -> float:
    """Weight matmuls for every token, attention over what each token sees (a prompt token:
    up to S entries + half its chunk on average; a decode: S entries)."""
    _, matmul_params = weight_counts(config)
    per_head = 4 * config.num_heads * config.head_dim * config.num_layers
    prompt = prompt_tokens * (2 * matmul_params + per_head * (state_size + chunk / 2))
    decode = decodes * steps * (2 * matmul_params + per_head * state_size)
    return prompt + decode


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ceilings = measure_ceilings(device)
    rate = ceilings.matmul_flops_per_s
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}: matmul {rate / 1e12:.3g} TFLOP/s, copy "
          f"{ceilings.copy_bytes_per_s / 1e9:.0f} GB/s")
    results = {"device": name, "matmul_flops_per_s": rate, "args": vars(args), "rows": []}
    print(f"{'chunk':>6} {'tokens':>6} {'decodes':>7} {'mode':>9} {'pack':>4} {'step ms':>8} "
          f"{'prefill tok/s':>13} {'of matmul':>9}")
    for chunk in args.chunks:
        rig = Rig(args, chunk)
        config = rig.engine.core.executor.model_config
        for decodes in args.decodes:
            rig.set_decodes(decodes)
            for tokens in args.tokens:
                for mode in args.modes:
                    for pack in args.pack:
                        row = rig.row(tokens, mode, pack == "on")
                        flops = step_flops(config, row["prompt_tokens"], decodes,
                                           row["steps"], chunk, args.state_size)
                        row.update(chunk=chunk, tokens=tokens, decodes=decodes, mode=mode,
                                   pack=pack, share_of_matmul_rate=flops / row["seconds"] / rate)
                        results["rows"].append(row)
                        print(f"{chunk:6d} {tokens:6d} {decodes:7d} {mode:>9} {pack:>4} "
                              f"{row['step_ms_median']:8.1f} "
                              f"{row['prefill_tokens_per_s']:13.0f} "
                              f"{row['share_of_matmul_rate']:9.2f}", flush=True)
                        if args.profile and mode == "staggered" and decodes and tokens == max(
                                args.tokens):
                            rig.profile_step(args.profile, f"chunk {chunk}, {tokens} tokens, "
                                             f"{decodes} decodes, staggered, pack {pack}")
                        rig.drain()
        del rig
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
