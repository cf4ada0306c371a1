"""What the step benchmarks share: the engine flags they take (an 8B-shaped model with dummy
weights by default) and a device sync around timed work."""

from __future__ import annotations

import argparse

import torch


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="benchmarks/configs/llama-3.1-8b.json")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--policy", default="tova")
    parser.add_argument("--quantization", default=None, choices=["fp8"],
                        help="the weights' (default: the checkpoint's)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="the state's K/V storage")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
