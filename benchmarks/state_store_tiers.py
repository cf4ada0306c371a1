"""What a shared state directory costs, per saved state of a model's shape: writing it when it
is saved (the write-through every state gets with --state-store-dir, in the engine's step),
restoring it from the host tier (the replica that made it: where the balancer's stick table
sends a continuation), and from the directory (another replica, or this one after a restart).

Random K/V of the state's true shape (per layer [kv_heads, S, head_dim], positions), no model
needed; the directory is --dir (put it on the volume the replicas would share).

    python benchmarks/state_store_tiers.py --config benchmarks/configs/llama-3.1-8b.json \\
        --state-size 512 --dtype bfloat16 --dir /mnt/shared/tova-bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tova_engine.state.snapshots import SnapshotSpec, StateSnapshot
from tova_engine.state.store import StateStore

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a model's config.json (its shapes)")
    p.add_argument("--state-size", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--states", type=int, default=20, help="states written and restored")
    p.add_argument("--dir", default=None, help="the directory (default: a temporary one)")
    p.add_argument("--out", default=None, help="save the figures as JSON here")
    return p.parse_args(argv)


def snapshot(config: dict, size: int, dtype: torch.dtype, seed: int) -> StateSnapshot:
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    layers = config["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)

    def kv() -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(heads, size, head_dim, generator=g).to(dtype)
                     for _ in range(layers))

    spec = SnapshotSpec("bench", str(dtype).removeprefix("torch."), size, size, "tova")
    positions = tuple(torch.arange(size) for _ in range(layers))
    return StateSnapshot(spec, size, [0], kv(), kv(), positions)


def milliseconds(samples: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(samples) * 1e3, 2),
            "max_ms": round(max(samples) * 1e3, 2)}


def run(args: argparse.Namespace, directory: Path) -> dict:
    config = json.loads(Path(args.config).read_text())
    states = [snapshot(config, args.state_size, DTYPES[args.dtype], i)
              for i in range(args.states)]
    nbytes = states[0].nbytes
    budget = 4 * nbytes * args.states
    owner = StateStore(budget, directory, budget)  # the replica that makes them
    other = StateStore(budget, directory, budget)  # another replica on the same directory
    writes, from_host, from_dir = [], [], []
    for i, state in enumerate(states):
        started = time.perf_counter()
        owner.put(f"resp_{i}", state)
        writes.append(time.perf_counter() - started)
    for i in range(args.states):
        started = time.perf_counter()
        assert owner.get(f"resp_{i}") is not None
        from_host.append(time.perf_counter() - started)
        started = time.perf_counter()
        assert other.get(f"resp_{i}") is not None
        from_dir.append(time.perf_counter() - started)
    for i in range(args.states):
        owner.delete(f"resp_{i}")
    return {"config": Path(args.config).name, "state_size": args.state_size,
            "dtype": args.dtype, "state_mib": round(nbytes / 2**20, 2),
            "write_through": milliseconds(writes), "restore_host": milliseconds(from_host),
            "restore_directory": milliseconds(from_dir)}


def main() -> None:
    args = parse_args()
    if args.dir is None:
        with tempfile.TemporaryDirectory(prefix="tova-store-bench-") as folder:
            result = run(args, Path(folder))
    else:
        result = run(args, Path(args.dir))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
