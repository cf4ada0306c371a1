"""FP8 checkpoints as published on the Hub: what their `quantization_config` declares, their
tensors checked from the shards' headers before anything is allocated, and their weights
streamed for an FP8 model (model/fp8.py).

Two formats, both with float8 e4m3 weights and float32 scales beside them:
- compressed-tensors (`quant_method: "compressed-tensors"`, 8-bit float weights), e.g. the
  "-FP8" and "-FP8-dynamic" Llama checkpoints: `X.weight_scale` per tensor ([1]) or per
  output channel ([out, 1]);
- `quant_method: "fp8"` (transformers' and vLLM's): `X.weight_scale` per tensor, or
  `X.weight_scale_inv` per block (`weight_block_size`, e.g. [128, 128]; Qwen3's FP8 models).

Per-tensor and per-channel weights load exactly as stored (a tensor's scale is every row's
scale; q/k/v and gate/up keep their own when fused). Block-scaled weights are dequantized as
they are read and quantized again per channel, the one scheme the matmul takes: the values
move by at most e4m3's rounding. Static activation scales (`input_scale`) are not used: every
token gets its own scale. Stored K/V scales (`k_scale`, `v_scale`) are not used either.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tova_engine.loader.hf_folder import skipped
from tova_engine.model.fp8 import FP8

_FP8_DTYPE = "F8_E4M3"  # as safetensors headers name float8_e4m3fn
# Tensors a checkpoint may carry that the FP8 scheme here does not read.
_UNUSED_SUFFIXES = (".input_scale", ".k_scale", ".v_scale", ".kv_scale")


@dataclass(frozen=True, slots=True)
class Fp8Checkpoint:
    # Rows x columns one `weight_scale_inv` entry covers; None: per tensor or per channel.
    block: tuple[int, int] | None = None


def fp8_checkpoint(hf_config: dict[str, Any]) -> Fp8Checkpoint | None:
    """The checkpoint's FP8 scheme from config.json, None when it is not quantized; refuses
    (ValueError) a quantization this engine cannot load."""
    quant = hf_config.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ValueError("model: config.json quantization_config must be an object")
    method = quant.get("quant_method")
    if method == "fp8":
        if quant.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"model: FP8 format {quant.get('fmt')!r} is not supported; "
                             "e4m3 is")
        return Fp8Checkpoint(_block(quant.get("weight_block_size"), "weight_block_size"))
    if method == "compressed-tensors":
        return _compressed_tensors(quant)
    raise ValueError(
        f"model: quantization_config quant_method {method!r} is not supported; FP8 "
        "checkpoints are ('fp8', or 'compressed-tensors' with 8-bit float weights)"
    )


def _compressed_tensors(quant: dict[str, Any]) -> Fp8Checkpoint:
    block = None
    for name, group in (quant.get("config_groups") or {}).items():
        weights = (group or {}).get("weights") or {}
        if weights.get("num_bits") != 8 or weights.get("type") != "float":
            raise ValueError(
                f"model: quantization_config group {name!r} quantizes weights to "
                f"{weights.get('num_bits')}-bit {weights.get('type')}; only 8-bit float (FP8) "
                "checkpoints are supported"
            )
        if weights.get("strategy") == "block":
            block = _block(weights.get("block_structure"), f"{name}.weights.block_structure")
    return Fp8Checkpoint(block)


def _block(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"model: quantization_config {where} must be two positive integers; "
                         f"got {value!r}")
    return value[0], value[1]


class _Headers:
    """Every tensor's shard, dtype and shape, from the shards' headers (no data read)."""

    def __init__(self, files: list[Path]) -> None:
        self.where: dict[str, Path] = {}
        self.dtype: dict[str, str] = {}
        self.shape: dict[str, list[int]] = {}
        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    piece = f.get_slice(name)
                    self.where[name] = path
                    self.dtype[name] = piece.get_dtype()
                    self.shape[name] = list(piece.get_shape())


def check_fp8_tensors(files: list[Path], checkpoint: Fp8Checkpoint) -> int:
    """Every float8 weight has its scales, of a shape its scheme allows; returns how many
    float8 weights there are. Raises ValueError naming the first tensor that is wrong."""
    headers = _Headers(files)
    count = 0
    for name, dtype in headers.dtype.items():
        if dtype.startswith("F8") and dtype != _FP8_DTYPE:
            raise ValueError(f"checkpoint tensor {name} is {dtype}; FP8 weights must be e4m3")
        if dtype != _FP8_DTYPE:
            continue
        shape = headers.shape[name]
        if not name.endswith(".weight") or len(shape) != 2:
            raise ValueError(f"checkpoint tensor {name} is float8 but not a projection's "
                             "2-D weight")
        count += 1
        _check_scale(name, shape, headers, checkpoint)
    return count


def _check_scale(name: str, shape: list[int], headers: _Headers, checkpoint: Fp8Checkpoint):
    rows, columns = shape
    if checkpoint.block is not None:
        scale = name + "_scale_inv"
        b0, b1 = checkpoint.block
        wanted = [math.ceil(rows / b0), math.ceil(columns / b1)]
        if scale not in headers.shape:
            raise ValueError(f"checkpoint: FP8 weight {name} has no {scale} tensor "
                             f"(block-wise scales, {b0}x{b1})")
        if headers.shape[scale] != wanted:
            raise ValueError(f"checkpoint tensor {scale} has shape {headers.shape[scale]}; "
                             f"{name} {shape} in {b0}x{b1} blocks needs {wanted}")
        return
    scale = name + "_scale"
    if scale not in headers.shape:
        raise ValueError(f"checkpoint: FP8 weight {name} has no {scale} tensor")
    size = math.prod(headers.shape[scale])
    if size not in (1, rows) or len(headers.shape[scale]) > 2:
        raise ValueError(
            f"checkpoint tensor {scale} has shape {headers.shape[scale]}; {name} {shape} "
            f"needs one scale (per tensor) or {rows} (per output channel)"
        )


def fp8_weights(
    files: list[Path], tied: bool, dtype: torch.dtype, checkpoint: Fp8Checkpoint
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors for an FP8 model: float8 weights as stored, each followed by
    its per-row float32 scales ("X.weight_scale", [rows]); block-scaled ones dequantized to
    `dtype` (the model quantizes them per row); every other tensor in `dtype`."""
    headers = _Headers(files)
    handles: dict[Path, Any] = {}

    def read(name: str) -> torch.Tensor:
        path = headers.where[name]
        if path not in handles:
            handles[path] = safe_open(path, framework="pt", device="cpu")
        return handles[path].get_tensor(name)

    try:
        for name in headers.where:
            if skipped(name, tied) or name.endswith((*_UNUSED_SUFFIXES, "_scale", "_scale_inv")):
                continue
            tensor = read(name)
            if tensor.dtype != FP8:
                yield name, tensor.to(dtype)
            elif checkpoint.block is not None:
                yield name, dequantize_blocks(tensor, read(name + "_scale_inv"),
                                              checkpoint.block).to(dtype)
            else:
                scale = read(name + "_scale").float().reshape(-1)
                yield name, tensor
                yield name + "_scale", scale.expand(tensor.shape[0]).contiguous()
    finally:
        handles.clear()


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]):
    """float8 [rows, columns] with a scale per b0 x b1 block -> float32."""
    b0, b1 = block
    rows, columns = weight.shape
    scales = scale_inv.float().repeat_interleave(b0, dim=0).repeat_interleave(b1, dim=1)
    return weight.float() * scales[:rows, :columns]
