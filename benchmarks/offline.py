"""Offline generation throughput: N sequences with short prompts and long outputs
(ignore_eos), all submitted at once to `LLM.generate`.

    python benchmarks/offline.py --model benchmarks/configs/smollm2-135m.json \
        --load-format dummy --num-seqs 32 --input-len 32 --output-len 256 --state-size 256

Prints one markdown row per policy/state size and saves JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from tova_engine import LLM, SamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--policy", default="tova")
    parser.add_argument("--state-size", type=int, nargs="+", default=[256])
    parser.add_argument("--num-seqs", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--prefill-chunk-size", type=int, default=512)
    parser.add_argument("--out", default=None, help="write results as JSON here")
    return parser.parse_args()


def run_one(args: argparse.Namespace, state_size: int) -> dict:
    llm = LLM(
        args.model, state_size=state_size, policy=args.policy, dtype=args.dtype,
        device=args.device, max_num_seqs=args.num_seqs, load_format=args.load_format,
        prefill_chunk_size=args.prefill_chunk_size,
        max_model_len=max(args.input_len + args.output_len, state_size),
    )
    vocab = llm.engine.core.executor.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.input_len)]
               for _ in range(args.num_seqs)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "policy": args.policy, "state_size": state_size, "num_seqs": args.num_seqs,
        "device": llm.engine.info.device, "dtype": str(llm.engine.config.torch_dtype),
        "output_tokens": generated, "seconds": elapsed,
        "output_tokens_per_s": generated / elapsed,
        "state_bytes_per_seq": llm.engine.info.state_bytes_per_sequence,
    }


def main() -> None:
    args = parse_args()
    rows = [run_one(args, s) for s in args.state_size]
    print("| policy | S | seqs | device | output tok/s | state MiB/seq |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['state_size']} | {r['num_seqs']} | {r['device']} "
              f"| {r['output_tokens_per_s']:.1f} | {r['state_bytes_per_seq'] / 2**20:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
