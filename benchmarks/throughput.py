"""Throughput on a fixed state-memory budget: the paper's Table 1 setup, on one GPU, in one run.

Every row (`full` at 4096, `tova` at 2048, 1024, 512, 256) gets as many concurrent sequences
as the state budget holds, and runs one wave of that many sequences: random prompts of
`--input-len` tokens, `--output-len` generated tokens each (greedy, ignore_eos), random
weights with the real model's shapes (`load_format="dummy"`). The same workload then runs
through transformers' `generate` with its own cache at the largest batch whose cache fits the
same budget (for `--hf-output-len` tokens: it is slow). A roofline column compares each
decode step with the copy bandwidth and bf16 matmul rate measured in the same run. Two checks
on SmolLM2-135M shapes follow: batch-1 decode with CUDA graphs against eager execution, and
GPU memory after 1k and after 16k generated tokens.

    python benchmarks/throughput.py --model benchmarks/configs/llama-3.1-8b.json \
        --state-budget-gib 8 --output-len 2048 --out-dir bench-out

Writes throughput.json and throughput.png to --out-dir and prints markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from pathlib import Path

import torch
from roofline import Ceilings, decode_step_cost, measure_ceilings

from tova_engine import EngineConfig, LLMEngine, SamplingParams
from tova_engine.loader.hf_folder import read_json
from tova_engine.model.config import ModelConfig
from tova_engine.model.registry import config_from_hf
from tova_engine.state.kv_state import KVState

CONFIGS = Path(__file__).parent / "configs"
ROWS = ("full:4096", "tova:512", "tova:256", "tova:1024", "tova:2048")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(CONFIGS / "llama-3.1-8b.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--state-budget-gib", type=float, default=8.0)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="policy:state_size")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=2048)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--hf-output-len", type=int, default=128)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--small-model", default=str(CONFIGS / "smollm2-135m.json"))
    parser.add_argument("--small-output-len", type=int, default=256)
    parser.add_argument("--memory-tokens", type=int, nargs=2, default=[1024, 16384])
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--out-dir", default="bench-out")
    return parser.parse_args()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def random_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


class StepLog:
    """The engine's per-step stats: (phase, seconds, rows, generated tokens)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float, int, int]] = []

    def __call__(self, stats) -> None:
        self.steps.append(
            (stats.phase, stats.duration_s, stats.batch_size, stats.generation_tokens)
        )

    def median_decode_s(self, batch: int) -> float | None:
        full = [s for phase, s, rows, _ in self.steps if phase == "decode" and rows == batch]
        return statistics.median(full) if full else None


def run_engine(config: EngineConfig, prompts, output_len: int) -> tuple[dict, StepLog]:
    """One wave: every prompt submitted at once, stepped until all are done."""
    log = StepLog()
    engine = LLMEngine(config, stats_callback=log)
    engine.add_request("warm-up", prompts[0], SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    log.steps.clear()
    # Outputs only when a request finishes, as LLM.generate asks for them.
    params = SamplingParams(
        temperature=0, max_tokens=output_len, ignore_eos=True, output_kind="final"
    )
    sync()
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    first_token_s = None
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated += len(out.outputs[0].token_ids)
        scheduler = engine.core.scheduler
        prefilling = scheduler.num_waiting or any(r.prefilling for r in scheduler.running)
        if first_token_s is None and not prefilling:
            first_token_s = time.perf_counter() - started
    sync()
    elapsed = time.perf_counter() - started
    result = {
        "output_tokens": generated,
        "seconds": elapsed,
        "output_tok_s": generated / elapsed,
        "prefill_s": first_token_s,
        "state_bytes_per_seq": engine.info.state_bytes_per_sequence,
        "cuda_graphs": engine.core.executor.worker.runner.graphs is not None,
    }
    del engine
    return result, log


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_row(args, model_config: ModelConfig, policy: str, state_size: int, ceilings) -> dict:
    dtype = getattr(torch, args.dtype)
    per_seq = KVState.bytes_per_sequence(model_config, state_size, dtype)
    batch = min(int(args.state_budget_gib * 2**30) // per_seq, args.max_batch)
    free_memory()
    config = EngineConfig(
        model=args.model,
        load_format="dummy",
        dtype=args.dtype,
        device=args.device,
        state_size=state_size,
        policy=policy,
        max_num_seqs=batch,
        max_model_len=max(args.input_len + args.output_len, state_size),
    )
    prompts = random_prompts(batch, args.input_len, model_config.vocab_size)
    result, log = run_engine(config, prompts, args.output_len)
    step_s = log.median_decode_s(batch)
    # Entries each row attends over at the median decode step.
    entries = min(args.input_len + args.output_len / 2, state_size)
    element = torch.empty((), dtype=dtype).element_size()
    cost = decode_step_cost(model_config, batch, entries, element, ceilings)
    result.update(
        policy=policy,
        state_size=state_size,
        max_batch=batch,
        decode_step_ms=None if step_s is None else 1e3 * step_s,
        decode_tok_s=None if step_s is None else batch / step_s,
        peak_gib=peak_gib(),
        roofline_ms=1e3 * cost.limit_s,
        roofline_bound=cost.bound,
        roofline_pct=None if step_s is None else 100 * cost.limit_s / step_s,
        step_bytes=cost.bytes,
        step_flops=cost.flops,
    )
    return result


def bench_hf(args, model_config: ModelConfig) -> dict:
    """transformers' generate with its own (dynamic) cache, at the largest batch whose cache
    for the whole workload (prompt + --output-len tokens) fits the same budget."""
    import transformers

    dtype = getattr(torch, args.dtype)
    # The whole workload's cache; sliding-window layers (Gemma 3) hold their window only.
    per_seq = KVState.bytes_per_sequence(model_config, args.input_len + args.output_len, dtype)
    batch = int(args.state_budget_gib * 2**30) // per_seq
    batch = max(1, min(batch, args.max_batch))
    free_memory()
    hf_config = transformers.AutoConfig.for_model(**read_json(Path(args.model)))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    prompts = torch.tensor(random_prompts(batch, args.input_len, model_config.vocab_size))
    prompts = prompts.to(args.device)

    def generate(new_tokens: int) -> None:
        with torch.inference_mode():
            model.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    generate(4)  # warm-up
    sync()
    started = time.perf_counter()
    generate(args.hf_output_len)
    sync()
    elapsed = time.perf_counter() - started
    result = {
        "policy": "transformers generate",
        "max_batch": batch,
        "output_tokens": batch * args.hf_output_len,
        "seconds": elapsed,
        "output_tok_s": batch * args.hf_output_len / elapsed,
        "decode_step_ms": 1e3 * elapsed / args.hf_output_len,
        "peak_gib": peak_gib(),
        "transformers": transformers.__version__,
    }
    return result


def bench_small_batch1(args) -> list[dict]:
    """Batch-1 decode on small-model shapes: launch overhead is what it pays."""
    vocab = config_from_hf(read_json(Path(args.small_model))).vocab_size
    prompts = random_prompts(1, args.input_len, vocab)
    modes = {
        "cuda graphs (triton)": {},
        "eager (triton)": {"enforce_eager": True},
        "eager (pytorch)": {"kernels": "torch"},
    }
    rows = []
    for name, options in modes.items():
        free_memory()
        config = small_model_config(args, max_num_seqs=1, **options)
        result, log = run_engine(config, prompts, args.small_output_len)
        step_s = log.median_decode_s(1)
        result.update(mode=name, decode_step_ms=1e3 * step_s, decode_tok_s=1 / step_s)
        rows.append(result)
    return rows


def small_model_config(args, **options) -> EngineConfig:
    """The small-model sections' engine: dummy weights of `--small-model`'s shapes, S = 256."""
    return EngineConfig(
        model=args.small_model,
        load_format="dummy",
        dtype=args.dtype,
        device=args.device,
        state_size=256,
        **options,
    )


def bench_memory(args) -> dict:
    """GPU memory in use after the first and the last of `--memory-tokens` generated tokens."""
    early, late = args.memory_tokens
    vocab = config_from_hf(read_json(Path(args.small_model))).vocab_size
    free_memory()
    config = small_model_config(args, max_num_seqs=4, max_model_len=args.input_len + late)
    readings: dict[int, int] = {}
    engine = LLMEngine(config)
    for i, prompt in enumerate(random_prompts(4, args.input_len, vocab)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=late, ignore_eos=True))
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        running = engine.core.scheduler.running
        generated = len(running[0].sequences[0].output_token_ids) if running else late
        if generated in (early, late - 1) and generated not in readings:
            sync()
            readings[generated] = torch.cuda.memory_allocated()
    return {
        "tokens_per_seq": [early, late - 1],
        "allocated_bytes": [readings.get(early), readings.get(late - 1)],
        "constant": readings.get(early) == readings.get(late - 1),
        "seconds": time.perf_counter() - started,
        "state_bytes_total": engine.core.executor.state_total_bytes(),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(rows: list[dict], hf: dict | None, gpu: str) -> None:
    full = next((r for r in rows if r["policy"] == "full"), None)
    print(f"\n{gpu}: throughput on a {rows[0]['budget_gib']:g} GiB state budget")
    print(
        "| policy | S | max batch | output tok/s | vs full | decode step ms | decode tok/s "
        "| roofline ms (bound) | % of roofline | state MiB/seq | peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in [*rows, *([hf] if hf else [])]:
        ratio = r["output_tok_s"] / full["output_tok_s"] if full else None
        roofline = ""
        if "roofline_ms" in r:
            roofline = f"{r['roofline_ms']:.2f} ({r['roofline_bound']})"
        state = r.get("state_bytes_per_seq")
        print(
            f"| {r['policy']} | {r.get('state_size', 'dynamic')} | {r['max_batch']} "
            f"| {r['output_tok_s']:.0f} | {_fmt(ratio, '.2f')}x "
            f"| {_fmt(r['decode_step_ms'], '.2f')} | {_fmt(r.get('decode_tok_s'), '.0f')} "
            f"| {roofline} | {_fmt(r.get('roofline_pct'), '.0f')}% "
            f"| {_fmt(state and state / 2**20, '.1f')} | {_fmt(r['peak_gib'], '.1f')} |"
        )


def plot(rows: list[dict], hf: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tova = sorted((r for r in rows if r["policy"] == "tova"), key=lambda r: r["state_size"])
    full = next((r for r in rows if r["policy"] == "full"), None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    sizes = [r["state_size"] for r in tova]
    left.plot(sizes, [r["output_tok_s"] for r in tova], "o-", label="tova")
    if full:
        left.axhline(full["output_tok_s"], color="gray", ls="--", label="full (4096)")
        right.plot(sizes, [r["output_tok_s"] / full["output_tok_s"] for r in tova], "o-")
    if hf:
        left.axhline(hf["output_tok_s"], color="red", ls=":", label="transformers generate")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("state size S (entries per layer)")
    left.set_ylabel("output tokens/s")
    left.legend()
    right.set_ylabel("throughput / full")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model_config = config_from_hf(read_json(Path(args.model)))
    ceilings = measure_ceilings(device)
    print(
        f"{gpu}: copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s, "
        f"matmul {ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    report: dict = {
        "gpu": gpu,
        "torch": torch.__version__,
        "model": Path(args.model).name,
        "args": vars(args),
        "ceilings": Ceilings(*ceilings)._asdict(),
    }
    hf = None
    if not args.skip_hf:  # first: it is short, and the target needs it
        hf = bench_hf(args, model_config)
        print(f"transformers: {json.dumps(hf)}", flush=True)
        report["transformers"] = hf
    rows = []
    for spec in args.rows:
        policy, size = spec.split(":")
        started = time.perf_counter()
        row = bench_row(args, model_config, policy, int(size), ceilings)
        row["budget_gib"] = args.state_budget_gib
        rows.append(row)
        print(f"{spec}: {json.dumps(row)} ({time.perf_counter() - started:.0f} s)", flush=True)
        report["rows"] = rows
        (out_dir / "throughput.json").write_text(json.dumps(report, indent=2))
    if not args.skip_small:
        report["small_batch1"] = bench_small_batch1(args)
        print(f"small batch 1: {json.dumps(report['small_batch1'])}", flush=True)
        report["memory"] = bench_memory(args)
        print(f"memory: {json.dumps(report['memory'])}", flush=True)
    (out_dir / "throughput.json").write_text(json.dumps(report, indent=2))
    plot(rows, hf, out_dir / "throughput.png")
    print_table(rows, hf, gpu)


if __name__ == "__main__":
    main()
