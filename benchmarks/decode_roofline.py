"""Decode steps at large batches with a full state (eviction every step) against the roofline,
and step time against the tokens already generated.

For each `batch:state_size`, `batch` sequences prefill `state_size` prompt tokens, then decode:
wall time per step (host included, synchronised), GPU-busy time per step (the sum of the
device kernels' time from torch.profiler over a window of steps) and the roofline limit of
that step (benchmarks/roofline.py: bytes moved over the measured copy bandwidth). Then one
long run reports the median step time in windows of generated tokens (constant host work:
the step must stay flat).

    python benchmarks/decode_roofline.py --model benchmarks/configs/llama-3.1-8b.json \\
        --rows 128:512 256:512 512:256 --flat-batch 64 --flat-tokens 8000
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
from benchmarks.roofline import decode_step_cost, measure_ceilings
from tova_engine import SamplingParams
from tova_engine.config import EngineConfig
from tova_engine.frontend.llm_engine import LLMEngine


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_flags(p)
    p.add_argument("--rows", nargs="+", default=["128:512", "256:512", "512:256"],
                   help="batch:state_size")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per row")
    p.add_argument("--flat-batch", type=int, default=64)
    p.add_argument("--flat-state-size", type=int, default=512)
    p.add_argument("--flat-tokens", type=int, default=8000, help="0: skip the flatness run")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--device-split", action="store_true",
                   help="for the first row: GPU time of the graph replay, the sampler and the "
                        "whole step from CUDA events, and the forward's kernels by name (eager)")
    p.add_argument("--mixed-prefill", type=int, nargs="*", default=[],
                   help="for the first row: time a step that also prefills this many new "
                        "--mixed-prompt-len-token prompts (each count its own step)")
    p.add_argument("--mixed-prompt-len", type=int, default=128)
    p.add_argument("--mixed-profile", default=None,
                   help="append the profiler's table (host time by op) of each mixed step here")
    p.add_argument("--profile", default=None,
                   help="write a torch.profiler table (host and device) of a few steps of the "
                        "first row here")
    return p.parse_args()


def make_engine(args, batch: int, state_size: int, spare_slots: int = 0) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
        policy=args.policy, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        state_size=state_size, max_num_seqs=batch + spare_slots,
        max_num_batched_tokens=max(batch * 2, 2048, batch + spare_slots * args.mixed_prompt_len),
        prefill_chunk_size=state_size,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        # Every timed step decodes the whole batch: its one graph is all that is replayed.
        cuda_graph_batch_sizes=(batch + spare_slots,),
    ))


def start(engine: LLMEngine, batch: int, prompt_len: int, max_tokens: int) -> None:
    """`batch` sequences past a `prompt_len`-token prefill, decoding from now on."""
    rng = random.Random(0)
    vocab = engine.info.vocab_size
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind="final")
    for i in range(batch):
        engine.add_request(str(i), [rng.randrange(3, vocab) for _ in range(prompt_len)], params)
    while engine.num_waiting or any(r.prefilling for r in engine.core.scheduler.running):
        engine.step()
    engine.step()  # the first decode step (one more token: the state is full from here on)


def timed(engine: LLMEngine) -> float:
    sync()
    started = time.perf_counter()
    engine.step()
    sync()
    return time.perf_counter() - started


def gpu_busy_s(engine: LLMEngine, steps: int) -> float | None:
    """Mean device-kernel time per step over `steps` steps."""
    if not torch.cuda.is_available():
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e6 / steps


class Split:
    """Wall time inside each wrapped stage of a step, summed over the steps it wraps."""

    def __init__(self, engine: LLMEngine) -> None:
        self.seconds: dict[str, float] = {}
        core = engine.core
        self._wrap(core.scheduler, "schedule", "schedule")
        runner = core.executor.worker.runner
        self._wrap(runner, "launch", "runner.launch (model, sampling, queue read-back)")
        self._wrap(runner, "collect", "runner.collect (wait for the read-back)")
        self._wrap(engine.outputs, "process", "output processing (front end)")

    def _wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed_call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed_call)


def host_split(engine: LLMEngine, steps: int) -> dict[str, float]:
    """Mean ms per step in each stage; the rest of the wall time is the core's bookkeeping."""
    split = Split(engine)
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    total = time.perf_counter() - started
    result = {label: 1e3 * s / steps for label, s in split.seconds.items()}
    result["rest (core bookkeeping, StepOutputs)"] = 1e3 * total / steps - sum(result.values())
    return result


class _EventSpans:
    """GPU time between CUDA events recorded around each call of a wrapped function."""

    def __init__(self) -> None:
        self.pairs: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def recorded(*args, **kwargs):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            try:
                return inner(*args, **kwargs)
            finally:
                end.record()
                self.pairs.setdefault(label, []).append((begin, end))

        setattr(owner, name, recorded)

    def ms(self) -> dict[str, float]:
        torch.cuda.synchronize()
        return {label: statistics.median(b.elapsed_time(e) for b, e in pairs)
                for label, pairs in self.pairs.items()}


class _SamplerProxy:
    """Stands in for the runner's sampler so that its calls can be timed."""

    def __init__(self, sampler, spans: _EventSpans) -> None:
        self.sampler = sampler
        self.spans = spans
        spans.wrap(self, "call", "sampler")

    def call(self, *args, **kwargs):
        return self.sampler(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)


def replay_alone_ms(runner, reps: int = 10) -> float | None:
    """Median wall time of the decode graph replayed alone, synchronised before and after:
    the GPU time of the forward with nothing else queued."""
    if runner.graphs is None:
        return None
    slots = [int(s) for s in torch.nonzero(runner.state.num_seen > 0).flatten().tolist()]
    slots = [s for s in slots if s != runner.state.pad_slot][: runner.graphs.max_batch_size]
    tokens = runner.last_tokens[torch.tensor(slots, device=runner.device)]
    times = []
    for _ in range(reps):
        sync()
        started = time.perf_counter()
        runner.graphs.run(tokens, slots)
        sync()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def device_split(engine: LLMEngine, steps: int) -> dict:
    """Median GPU ms per step from CUDA events: the whole launch (model, sampler, read-back
    queued), the decode graph replay and the sampler; then the eager forward's kernels."""
    runner = engine.core.executor.worker.runner
    original_sampler, original_graphs = runner.sampler, runner.graphs
    spans = _EventSpans()
    spans.wrap(runner, "launch", "launch: whole step on the GPU")
    if runner.graphs is not None:
        spans.wrap(runner.graphs, "run", "decode graph replay")
    runner.sampler = _SamplerProxy(original_sampler, spans)
    for _ in range(steps):
        engine.step()
    result = {"event_ms": spans.ms()}
    engine.step()  # nothing launched ahead: the replay below runs alone
    result["event_ms"]["decode graph replayed alone, synchronised (wall)"] = replay_alone_ms(
        runner)
    del runner.launch
    runner.sampler = original_sampler
    if original_graphs is not None:
        del original_graphs.run
    # The same kernels without the graph, each visible to the profiler.
    runner.graphs = None
    for _ in range(3):
        engine.step()
    count = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(count):
            engine.step()
        sync()
    runner.graphs = original_graphs
    by_name: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = by_name.setdefault(event.name, [0.0, 0])
            entry[0] += event.device_time / 1e3 / count
            entry[1] += 1 / count
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    result["eager_kernels"] = [
        {"name": name[:90], "ms_per_step": ms, "launches_per_step": n} for name, (ms, n) in top
    ]
    return result


def mixed_prefill(engine: LLMEngine, counts: list[int], prompt_len: int, reps: int = 5,
                  profile_to: str | None = None) -> dict:
    """Wall and GPU time of a step that decodes the running batch and also prefills `count`
    new prompts, against a plain decode step right before it."""
    rng = random.Random(1)
    vocab = engine.info.vocab_size
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, output_kind="final")
    running = len(engine.core.scheduler.running)
    result = {}
    for count in counts:
        plain, mixed, mixed_gpu, launches = [], [], [], []
        for rep in range(reps):
            plain.append(timed(engine))
            for i in range(count):
                prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
                engine.add_request(f"mixed-{count}-{rep}-{i}", prompt, params)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync()
            begin.record()
            if rep == reps - 1:
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    mixed.append(timed(engine))
                launches.append(sum(1 for e in prof.events()
                                    if e.device_type == torch.autograd.DeviceType.CUDA))
                if profile_to:
                    with open(profile_to, "a") as f:
                        f.write(f"\n# step with {count} new prompt(s)\n")
                        f.write(prof.key_averages().table(sort_by="self_cpu_time_total",
                                                          row_limit=40))
            else:
                mixed.append(timed(engine))
            end.record()
            sync()
            mixed_gpu.append(begin.elapsed_time(end))
            while len(engine.core.scheduler.running) > running or engine.num_waiting:
                engine.step()
        # With prefill graphs a shape runs eagerly when first seen, is captured the second
        # time and replayed from then on: the first step and the last three, apart.
        result[count] = {"plain_step_ms": 1e3 * statistics.median(plain),
                         "first_mixed_step_ms": 1e3 * mixed[0],
                         "mixed_step_ms": 1e3 * statistics.median(mixed[-3:]),
                         "kernels_in_mixed_step": launches[-1]}
    return result


def profile_table(engine: LLMEngine, steps: int) -> str:
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    if torch.cuda.is_available():
        tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=30))
    return "\n".join(tables)


def roofline_row(args, ceilings, batch: int, state_size: int, first: bool) -> dict:
    spare = max(args.mixed_prefill, default=0) if first else 0
    engine = make_engine(args, batch, state_size, spare)
    start(engine, batch, state_size, max_tokens=args.steps * 5 + 300)
    for _ in range(10):  # warm-up at this shape
        engine.step()
    wall = statistics.median(timed(engine) for _ in range(args.steps))
    busy = gpu_busy_s(engine, args.steps)
    split = host_split(engine, args.steps)
    if first and args.profile:
        Path(args.profile).write_text(profile_table(engine, 5))
    extra = {}
    if first and args.device_split and torch.cuda.is_available():
        extra["device_split"] = device_split(engine, args.steps)
    if first and args.mixed_prefill and torch.cuda.is_available():
        extra["mixed_prefill"] = mixed_prefill(engine, args.mixed_prefill, args.mixed_prompt_len,
                                               profile_to=args.mixed_profile)
    config = engine.core.executor.model_config
    element = torch.empty((), dtype=engine.config.torch_dtype).element_size()
    cost = decode_step_cost(config, batch, state_size, element, ceilings)
    row = {"batch": batch, "state_size": state_size, "wall_ms": 1e3 * wall,
           "gpu_busy_ms": None if busy is None else 1e3 * busy,
           "roofline_ms": 1e3 * cost.limit_s, "bound": cost.bound,
           "of_roofline": cost.limit_s / wall,
           "gpu_busy_of_wall": None if busy is None else busy / wall, "split_ms": split,
           **extra}
    del engine
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return row


def flatness(args) -> dict:
    """Median step time in windows of generated tokens, one long run."""
    batch, state_size, tokens = args.flat_batch, args.flat_state_size, args.flat_tokens
    engine = make_engine(args, batch, state_size)
    start(engine, batch, 16, max_tokens=tokens + 10)
    windows = {n: [] for n in (500, 1000, 2000, 4000, 8000) if n <= tokens}
    for generated in range(2, tokens + 1):
        seconds = timed(engine)
        for n, times in windows.items():
            if n - 50 < generated <= n + 50:
                times.append(seconds)
    medians = {n: 1e3 * statistics.median(t) for n, t in windows.items() if t}
    first = next(iter(medians.values()))
    return {"batch": batch, "state_size": state_size, "median_ms_at": medians,
            "max_over_first": max(medians.values()) / first}


def report_extras(row: dict) -> None:
    split = row.get("device_split")
    if split:
        print(f"GPU time per step from CUDA events at batch {row['batch']} (median ms): "
              + ", ".join(f"{label} {ms:.2f}" for label, ms in split["event_ms"].items()))
        print("eager forward + sampler kernels per step (top 25):")
        print("| kernel | ms/step | launches/step |\n|---|---|---|")
        for k in split["eager_kernels"][:25]:
            print(f"| {k['name']} | {k['ms_per_step']:.3f} | {k['launches_per_step']:.0f} |")
        total = sum(k["ms_per_step"] for k in split["eager_kernels"])
        launches = sum(k["launches_per_step"] for k in split["eager_kernels"])
        print(f"| all kernels | {total:.3f} | {launches:.0f} |")
    for count, m in (row.get("mixed_prefill") or {}).items():
        print(f"step with {count} new prompt(s) beside {row['batch']} decodes: "
              f"{m['mixed_step_ms']:.2f} ms (first time {m['first_mixed_step_ms']:.2f} ms; "
              f"plain decode step {m['plain_step_ms']:.2f} ms; "
              f"{m['kernels_in_mixed_step']} kernels)", flush=True)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    ceilings = measure_ceilings(device)
    print(f"ceilings: copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s, "
          f"matmul {ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    print("| batch, S | wall ms/step | GPU-busy ms | roofline ms | % of roofline | busy/wall |")
    print("|---|---|---|---|---|---|")
    for i, spec in enumerate(args.rows):
        batch, state_size = (int(x) for x in spec.split(":"))
        row = roofline_row(args, ceilings, batch, state_size, first=i == 0)
        rows.append(row)
        busy = "n/a" if row["gpu_busy_ms"] is None else f"{row['gpu_busy_ms']:.2f}"
        share = "n/a" if row["gpu_busy_of_wall"] is None else f"{row['gpu_busy_of_wall']:.0%}"
        print(f"| {batch}, {state_size} | {row['wall_ms']:.2f} | {busy} | "
              f"{row['roofline_ms']:.2f} | {row['of_roofline']:.0%} | {share} |", flush=True)
    for row in rows:
        print(f"host split at batch {row['batch']}, S={row['state_size']} (ms/step): "
              + ", ".join(f"{label} {ms:.2f}" for label, ms in row["split_ms"].items()))
    for row in rows:
        report_extras(row)
    result = {"ceilings": ceilings._asdict(), "rows": rows}
    if args.flat_tokens:
        result["flatness"] = flat = flatness(args)
        print(f"flatness (batch {flat['batch']}, S={flat['state_size']}): median ms at "
              + ", ".join(f"{n}: {ms:.2f}" for n, ms in flat["median_ms_at"].items())
              + f"; max/first {flat['max_over_first']:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
