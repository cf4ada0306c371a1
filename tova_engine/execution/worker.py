"""What runs a step on one device: the model (or this rank's shard of it), the state, the
runner, then its captured graphs. Every executor builds one for its own device; under tensor
parallelism every other rank builds its own the same way (`ranks/loop.py`), and the graphs
are captured once every rank has joined the group."""

from __future__ import annotations

import gc
import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from tova_engine.attention.fused import check_kernel_runs
from tova_engine.config import EngineConfig
from tova_engine.execution.decode_graphs import DecodeGraphs
from tova_engine.execution.memory import resolve_config, state_footprint, weight_bytes
from tova_engine.execution.prefill_graphs import PrefillGraphs
from tova_engine.execution.runner import ModelRunner
from tova_engine.execution.sampler import Sampler
from tova_engine.execution.threads import configure_cpu_threads
from tova_engine.loader import load_source
from tova_engine.model.config import ModelConfig
from tova_engine.model.fp8 import fp8_matmul_problem
from tova_engine.model.llama import LlamaModel
from tova_engine.model.registry import model_class
from tova_engine.model.sharding import check_divisible
from tova_engine.parallel import TensorParallel
from tova_engine.state.kv_state import KVState
from tova_engine.state.policies import Policy, make_policy

logger = logging.getLogger("tova_engine")


@dataclass(slots=True)
class Worker:
    config: EngineConfig  # resolved (device by index, max_num_seqs "auto" sized)
    model_config: ModelConfig  # the whole model's
    model_name: str
    tokenizer: Any
    max_model_len: int
    policy: Policy
    model: LlamaModel
    state: KVState
    eos_token_ids: frozenset[int]
    runner: ModelRunner
    tp: TensorParallel
    quantization: str | None = None  # the weights' ("fp8"), None: the dtype's

    def retained_by_rank(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every rank's (positions [layers, rows, S+1], num_entries [rows]) on the host, rank
        order: ranks that evicted alike hold the same. Every rank calls it at once."""
        positions = self.tp.all_gather(self.state.positions)
        entries = self.tp.all_gather(self.state.num_entries)
        return [(p.cpu(), n.cpu()) for p, n in zip(positions, entries, strict=True)]


def on_device(device: torch.device) -> AbstractContextManager:
    """`device` current in the context: Triton launches, graph captures and replays follow
    the thread's current device, not their tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def build_worker(config: EngineConfig, tp: TensorParallel) -> Worker:
    """config: with its device resolved (`executor.resolve_device`)."""
    with on_device(config.torch_device):
        return _build_worker(config, tp)


def _build_worker(config: EngineConfig, tp: TensorParallel) -> Worker:
    device, dtype = config.torch_device, config.torch_dtype
    configure_cpu_threads(device)  # before loading: GGUF dequantization uses threads
    # The prompt chunks' causal bias pulls in torch._dynamo (over a second): loaded while the
    # engine starts, not at the first prompt. attention/pytorch.py imports it lazily, so that
    # front-end processes, which import this package without running it, do not pay for it.
    import torch.nn.attention.bias  # noqa: F401
    source = load_source(config.model, config.load_format, dtype)
    model_config = source.config
    if tp.enabled:  # before any weight is read
        check_divisible(model_config, tp)
    max_model_len = resolve_max_model_len(config, model_config)
    policy = make_policy(config.policy, config.protect_recent)
    # The fused kernels run every declared policy (under tensor parallelism they all-reduce
    # the eviction scores, in CUDA graphs too); one that scores its own way cannot.
    fused = config.triton_kernels
    if fused:
        check_kernel_runs(policy)
    quantization = resolve_quantization(config, source.quantization)
    model = _build_model(config, model_config, source.weights, fused, tp, quantization)
    # Before the state is allocated: refuse one that cannot fit, size max_num_seqs="auto".
    # One GPU: the default prefix cache fills what the slots leave (a group keeps the fixed
    # share: every rank must hold the same rows, whatever each measures free).
    fill = config.torch_device.type == "cuda" and not tp.enabled
    config = resolve_config(config, model.local, weight_bytes(model), fill_prefix_cache=fill)
    use_graphs = fused and config.use_cuda_graphs
    state = KVState(
        model.local,
        config.max_num_seqs,
        config.state_size,
        dtype,
        device,
        track_stats=policy.uses_stats,
        pad_slot=use_graphs,
        tp=tp,
        cache_rows=state_footprint(config, model.local).cache_rows(config.max_num_seqs),
        kv_cache_dtype=config.kv_cache_dtype,
    )
    eos = _eos_token_ids(model_config, source.tokenizer)
    runner = ModelRunner(
        model, state, policy, Sampler(config.seed, device), eos, fused_attention=fused, tp=tp
    )
    return Worker(
        config, model_config, source.name, source.tokenizer, max_model_len, policy, model, state,
        eos, runner, tp, quantization,
    )


def capture_graphs(worker: Worker) -> None:
    """Capture the decode graphs and the full prefill chunks' (when the state has a padding
    slot, i.e. graphs are on). Under tensor parallelism a captured step holds collectives:
    every rank calls this once the group is formed, in the same order."""
    state, config, runner = worker.state, worker.config, worker.runner
    if state.pad_slot is None:
        return
    with on_device(config.torch_device):
        runner.graphs = DecodeGraphs(worker.model, state, worker.policy, config.graph_batch_sizes)
        if config.max_prefill_graphs:
            runner.prefill_graphs = PrefillGraphs(
                worker.model,
                state,
                worker.policy,
                max_graphs=config.max_prefill_graphs,
                max_captured_tokens=config.batched_token_budget,
            )
            runner.prefill_graphs.capture_grid(
                config.prefill_chunk_size, config.batched_token_budget, config.state_size
            )


def release_graphs(worker: Worker) -> None:
    """Drop the captured graphs before the group goes: NCCL keeps a communicator's resources
    until the graphs that captured its collectives are destroyed."""
    worker.runner.graphs = None
    worker.runner.prefill_graphs = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _build_model(
    config: EngineConfig,
    model_config: ModelConfig,
    weights,
    fused_kernels: bool,
    tp: TensorParallel,
    quantization: str | None = None,
) -> LlamaModel:
    family = model_class(model_config)
    model = family.empty(model_config, config.torch_device, config.torch_dtype, tp, quantization)
    if weights is None:
        model.init_random_weights(config.seed)
    else:
        model.load_hf_weights(weights)
    model.requires_grad_(False)
    if fused_kernels:
        model.use_triton_kernels()
    return model.eval()


def resolve_quantization(config: EngineConfig, checkpoint: str | None) -> str | None:
    """The weights' quantization: the flag's, else the checkpoint's; refused (ValueError
    naming `quantization`) where the device cannot run it, before any weight is allocated."""
    quantization = config.quantization or checkpoint
    if quantization == "fp8":
        problem = fp8_matmul_problem(config.torch_device)
        if problem is not None:
            source = "the checkpoint's FP8 weights" if config.quantization is None \
                else "quantization='fp8'"
            raise ValueError(f"quantization: {source} cannot run here: {problem}; run on "
                             "such a GPU or load a bfloat16 checkpoint")
    return quantization


def _eos_token_ids(model_config: ModelConfig, tokenizer) -> frozenset[int]:
    ids = set(model_config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    limit = model_config.max_position_embeddings
    wanted = config.max_model_len or limit
    if wanted > limit:
        logger.warning(
            "max_model_len %d exceeds the model's %d positions; quality past them is untested",
            wanted,
            limit,
        )
    if config.state_size > wanted:
        raise ValueError(
            f"state_size ({config.state_size}) must not exceed the model's length "
            f"limit ({wanted} positions)"
        )
    return wanted
