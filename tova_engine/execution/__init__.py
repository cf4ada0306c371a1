"""Execution: what runs a scheduled step on the device(s). The executor (`executor.py`) is
all the core sees: one device, or a tensor-parallel group whose other ranks it starts and
drives (`ranks/`). Each device builds a worker (`worker.py`: model, state, runner, captured
graphs); the runner builds the step's tensors, runs the model (prompt chunks through
`chunk_forward.py`, eagerly or replayed from `prefill_graphs.py`; decodes from
`decode_graphs.py`) and samples (`sampler.py`, `penalty_counts.py`, `logprobs.py`);
`memory.py` sizes the state before it is allocated."""
