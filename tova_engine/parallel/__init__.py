"""Tensor parallelism: one process per device, each holding its share of the attention heads,
the MLP and the vocabulary (Megatron-style), and its heads' share of the state. Rank 0 holds
the scheduler and sends every step's plan to the others (`worker.py`)."""

from tova_engine.parallel.group import SINGLE, TensorParallel

__all__ = ["SINGLE", "TensorParallel"]
