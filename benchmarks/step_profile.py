"""Where an engine step's time goes: decode-only, prefill-only and mixed steps, timed one by
one, with a torch.profiler summary of the prefill step.

    python benchmarks/step_profile.py --model benchmarks/configs/smollm2-135m.json \
        --load-format dummy --decodes 48 --prompts 16 --input-len 128

The serving benchmark reports mean step times per phase; this isolates them: `decodes`
sequences decode while `prompts` new prompts of `input-len` tokens arrive together, as under
continuous batching.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tova_engine import SamplingParams
from tova_engine.config import EngineConfig
from tova_engine.frontend.llm_engine import LLMEngine
from tova_engine.frontend.request_builder import PreparedRequest


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--state-size", type=int, default=256)
    parser.add_argument("--decodes", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=20, help="profiler rows to print")
    return parser.parse_args()


class StepTimer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engine = LLMEngine(EngineConfig(
            model=args.model, load_format=args.load_format, device=args.device,
            dtype=args.dtype, kernels=args.kernels, state_size=args.state_size,
            max_num_seqs=args.decodes + args.prompts,
            max_num_batched_tokens=max(2048, args.decodes + args.prompts * args.input_len),
        ))
        self.vocab = self.engine.core.executor.model_config.vocab_size
        self.rng = random.Random(0)
        self.requests: list[PreparedRequest] = []  # every request added, finished or not

    def add(self, number: int, input_len: int, max_tokens: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        for _ in range(number):
            prompt = [self.rng.randrange(3, self.vocab) for _ in range(input_len)]
            request_id = f"r{len(self.requests)}"
            self.requests.append(self.engine.add_request(request_id, prompt, params))

    def timed_step(self) -> float:
        sync()
        start = time.perf_counter()
        self.engine.step()
        sync()
        return time.perf_counter() - start

    def drain(self) -> None:
        for request in self.requests:
            self.engine.abort_request(request.request_id)  # a no-op once it has finished
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def start_decodes(self) -> None:
        """`decodes` sequences past their prefill, with many tokens still to go."""
        self.add(self.args.decodes, 16, self.engine.max_model_len - 16)
        decoding = self.requests[-self.args.decodes :]
        while self.engine.num_waiting or any(
            not r.state.sequences[0].token_ids for r in decoding
        ):
            self.engine.step()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """Prints the step times and the profile; returns the measured seconds per step kind."""
    timer = StepTimer(args)
    config = timer.engine.config
    print(f"device {config.torch_device}, {config.torch_dtype}, kernels {args.kernels}")
    decode, prefill, mixed = [], [], []
    for _ in range(args.repeats + 1):  # the first round warms up (compiles, graph capture)
        timer.add(args.prompts, args.input_len, 1)
        prefill.append(timer.timed_step())
        timer.drain()
        timer.start_decodes()
        decode.append(timer.timed_step())
        timer.add(args.prompts, args.input_len, 1)
        mixed.append(timer.timed_step())
        timer.drain()
    results = {"decode only": decode[1:], "prefill only": prefill[1:], "mixed": mixed[1:]}
    for name, times in results.items():
        ms = [1000 * t for t in times]
        print(f"{name:13s} median {statistics.median(ms):8.2f} ms  min {min(ms):8.2f} ms")
    timer.add(args.prompts, args.input_len, 1)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        timer.timed_step()
    timer.drain()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.top))
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
    return results


if __name__ == "__main__":
    measure(parse_args())
