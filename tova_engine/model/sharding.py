"""Megatron-style sharding of the Llama family over a tensor-parallel group.

Column-parallel (each rank holds a block of output rows): q/k/v (its query heads and the KV
heads they share), gate/up (a block of the MLP's width). Row-parallel (a block of input
columns, partial sums all-reduced): o and down. Vocabulary-parallel: the embedding (rows,
looked up where held and all-reduced) and the LM head (its vocabulary block's logits,
gathered once). An FP8 weight's per-row scales go with its rows: sliced where the rows are,
whole where the columns are. Norms are replicated (Gemma 3's four per layer and its per-head
q/k norms too: they act on whole hidden vectors or on one head). A Hugging Face tensor is sliced to
this rank's block as it is loaded, so no rank ever holds the whole model.
"""

from __future__ import annotations

import dataclasses

import torch

from tova_engine.model.config import ModelConfig
from tova_engine.parallel import TensorParallel


def check_divisible(config: ModelConfig, tp: TensorParallel) -> None:
    """Raises ValueError naming what tensor_parallel_size does not divide."""
    tp.shard(config.num_kv_heads, "key/value heads")
    tp.shard(config.intermediate_size, "MLP width (intermediate_size)")


def local_config(config: ModelConfig, tp: TensorParallel) -> ModelConfig:
    """The shapes this rank's layers have: its share of the heads and of the MLP."""
    if not tp.enabled:
        return config
    check_divisible(config, tp)
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // tp.size,
        num_kv_heads=config.num_kv_heads // tp.size,
        intermediate_size=config.intermediate_size // tp.size,
    )


def vocab_shard(vocab_size: int, tp: TensorParallel) -> tuple[int, int]:
    """This rank's [start, end) of the vocabulary, padded up to a multiple of the size (the
    last rank's padding rows are zeros and their logits are cut off after the gather)."""
    per_rank = -(-vocab_size // tp.size)
    return tp.rank * per_rank, (tp.rank + 1) * per_rank


def shard_hf_tensor(
    name: str, tensor: torch.Tensor, config: ModelConfig, tp: TensorParallel
) -> torch.Tensor:
    """The block of a Hugging Face-named tensor that this rank holds."""
    if not tp.enabled:
        return tensor
    d = config.head_dim
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        start, end = vocab_shard(config.vocab_size, tp)
        block = tensor[start:end]
        if block.shape[0] < end - start:  # padding rows of the last rank
            pad = tensor.new_zeros(end - start - block.shape[0], *tensor.shape[1:])
            block = torch.cat((block, pad))
        return block
    rows = {
        "self_attn.q_proj": config.num_heads * d,
        "self_attn.k_proj": config.num_kv_heads * d,
        "self_attn.v_proj": config.num_kv_heads * d,
        "mlp.gate_proj": config.intermediate_size,
        "mlp.up_proj": config.intermediate_size,
    }
    columns = {"self_attn.o_proj": config.num_heads * d, "mlp.down_proj": config.intermediate_size}
    for part, total in rows.items():
        if f".{part}." in name:
            start, end = tp.shard(total, part)
            return tensor[start:end]
    for part, total in columns.items():
        if f".{part}." in name and tensor.dim() > 1:  # (FP8 scales: one per output row)
            start, end = tp.shard(total, part)
            return tensor[:, start:end]
    return tensor  # norms: every rank holds them whole
