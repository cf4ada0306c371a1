"""Tensor parallelism's group: one process per device, each holding its share of the attention
heads, the MLP and the vocabulary (Megatron-style), and its heads' share of the state. This
package is the group and its collectives; the ranks' processes and their steps are
execution's (`execution/ranks/`)."""

from tova_engine.parallel.group import SINGLE, TensorParallel

__all__ = ["SINGLE", "TensorParallel"]
