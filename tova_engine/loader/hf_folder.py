"""Read a Hugging Face model folder (config.json + *.safetensors), locally or from the hub."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Files that carry a vocabulary; tokenizer_config.json alone cannot build a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_HUB_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt"]
# Seconds to wait for the hub's answer: a missing network must fail fast, not hang start-up.
_HUB_TIMEOUT_S = 10.0


def read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open() as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model: cannot read config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"model: config {path} is not a JSON object")
    return data


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's shards: the index's list when there is one, else every *.safetensors.

    The index matters for repos that also ship a consolidated.safetensors in another naming.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return [folder / shard for shard in shards]
    return sorted(folder.glob("*.safetensors"))


def safetensors_weights(
    files: list[Path], tied: bool, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor at a time from the memory-mapped shards, converted to dtype."""
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if skipped(name, tied):
                    continue
                yield name, f.get_tensor(name).to(dtype)


def safetensors_sizes(files: list[Path], tied: bool) -> tuple[int, int]:
    """(tensors, elements) that `safetensors_weights` will yield, from the shards' headers."""
    count = elements = 0
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if not skipped(name, tied):
                    count += 1
                    elements += math.prod(f.get_slice(name).get_shape())
    return count, elements


def skipped(name: str, tied: bool) -> bool:
    # Old Llama checkpoints saved RoPE's inv_freq buffer; it is recomputed, never loaded.
    # A tied head may still be saved; the model shares the embedding instead.
    return name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")


def folder_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"model: cannot load the tokenizer in {folder}: {e}") from e


def fetch_from_hub(repo_id: str, with_weights: bool) -> Path:
    """Download (or reuse the local cache of) a hub snapshot; HF_HUB_OFFLINE is honoured."""
    patterns = [*_HUB_PATTERNS, "*.safetensors"] if with_weights else _HUB_PATTERNS
    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=patterns,
            etag_timeout=_HUB_TIMEOUT_S,
            local_files_only=_offline(),
        )
    except Exception as e:  # network, auth, validation and cache errors all mean the same here
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(
            f"could not fetch model {repo_id!r} from the Hugging Face hub: {reason}; "
            "pass a local folder or .gguf file"
        ) from e
    return Path(path)


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so that setting it
    # later (a test, an embedding application) still keeps us off the network.
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return hf_constants.HF_HUB_OFFLINE or flag.upper() in {"1", "ON", "YES", "TRUE"}
