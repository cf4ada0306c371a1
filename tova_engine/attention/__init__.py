"""Attention over the bounded state with the policy's eviction: the backend contract, the
PyTorch path (CPU, and the reference the kernels are checked against), the fused path (CUDA),
and the packing of a step's parts into one forward."""
