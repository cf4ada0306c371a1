"""The same workload offline (`LLM.generate`) and through `tova-serve`, side by side in one run.

N requests of --input-len random prompt tokens -> --output-len tokens (ignore_eos). Offline,
all are submitted at once; served, `benchmarks/serve.py` streams them over --max-concurrency
connections to a server it launches with the same engine settings. Prints both, the ratio,
and the engine's step times, and saves them as JSON.

    python benchmarks/server_vs_offline.py --model benchmarks/configs/llama-3.1-8b.json \\
        --load-format dummy --dtype bfloat16 --state-size 512 --max-num-seqs 256 \\
        --num-prompts 512 --input-len 128 --output-len 512 --max-concurrency 256
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import serve
from tova_engine import LLM, SamplingParams


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--policy", default="tova")
    p.add_argument("--state-size", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--num-warmups", type=int, default=0)
    p.add_argument("--port", type=int, default=8199)
    p.add_argument("--client-processes", type=int, default=1)
    p.add_argument("--server-flags", default="", help="more flags for the launched server")
    p.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--skip-server", action="store_true")
    p.add_argument("--result-file", default=None)
    return p.parse_args()


def engine_flags(args: argparse.Namespace) -> list[str]:
    overlap = {"auto": [], "on": ["--async-scheduling"], "off": ["--no-async-scheduling"]}
    return [*overlap[args.async_scheduling], "--model", args.model,
            "--load-format", args.load_format, "--dtype", args.dtype, "--device", args.device,
            "--policy", args.policy,
            "--state-size", str(args.state_size), "--max-num-seqs", str(args.max_num_seqs),
            "--tensor-parallel-size", str(args.tensor_parallel_size)]


def offline(args: argparse.Namespace) -> dict:
    steps: list[tuple[str, float, int]] = []
    llm = LLM(args.model, state_size=args.state_size, policy=args.policy, dtype=args.dtype,
              device=args.device, max_num_seqs=args.max_num_seqs,
              load_format=args.load_format, tensor_parallel_size=args.tensor_parallel_size,
              async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling])
    llm.engine.stats_callback = lambda s: steps.append((s.phase, s.duration_s, s.batch_size))
    vocab = llm.engine.info.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.input_len)]
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: min(16, len(prompts))], params, use_tqdm=False)  # warm-up
    steps.clear()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    decode = [d for phase, d, _ in steps if phase == "decode"]
    full = [d for phase, d, b in steps if phase == "decode" and b == args.max_num_seqs]
    result = {
        "output_tokens": generated, "seconds": elapsed, "output_tok_s": generated / elapsed,
        "request_throughput": len(outputs) / elapsed,
        "steps": len(steps),
        "mean_decode_step_ms": 1e3 * statistics.fmean(decode) if decode else None,
        "decode_steps": len(decode),
        "prefill_steps": len(steps) - len(decode),
        "prefill_seconds": sum(d for phase, d, _ in steps if phase == "prefill"),
        "median_full_batch_decode_step_ms": 1e3 * statistics.median(full) if full else None,
    }
    llm.close()  # the other tensor-parallel ranks give their GPUs back
    del llm
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:  # no CUDA: nothing to give back
        pass
    return result


def served(args: argparse.Namespace) -> dict:
    flags = " ".join([*engine_flags(args), args.server_flags]).strip()
    return serve.main([
        "--launch", flags, "--base-url", f"http://127.0.0.1:{args.port}",
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--num-warmups", str(args.num_warmups), "--client-processes", str(args.client_processes),
    ])


def main() -> None:
    args = parse_args()
    result: dict = {"settings": vars(args)}
    if not args.skip_offline:
        result["offline"] = offline(args)
        print("offline:", json.dumps(result["offline"]), flush=True)
    if not args.skip_server:
        result["server"] = served(args)
    if "offline" in result and "server" in result:
        ratio = result["server"]["output_throughput"] / result["offline"]["output_tok_s"]
        result["server_over_offline"] = ratio
        print(f"\n| path | output tok/s |\n|---|---|\n"
              f"| offline LLM.generate | {result['offline']['output_tok_s']:,.0f} |\n"
              f"| tova-serve, {args.max_concurrency} streams | "
              f"{result['server']['output_throughput']:,.0f} ({ratio:.2f}x) |")
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
