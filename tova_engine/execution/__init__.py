"""Execution: what runs a scheduled step on the device(s): the executor (one device or a
tensor-parallel group), the model runner, the sampler, captured graphs, memory sizing."""
