"""Engine configuration: one frozen dataclass, validated on construction.

Each field carries its `tova-serve` flag's help text (`setting`): server/cli.py builds the
flag, its default and its help from the field, so the CLI and the library agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tova_engine.kernels import triton_available
from tova_engine.model.fp8 import QUANTIZATIONS
from tova_engine.state.kv_state import KV_CACHE_DTYPES
from tova_engine.state.policies import POLICIES, Policy, make_policy
from tova_engine.validation import (
    is_finite_number,
    is_int,
    is_positive_int,
    require_choice,
    require_count,
    require_fraction,
    require_positive_int,
)

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPES_BY_DEVICE = {
    "cpu": ("float32", "float64", "bfloat16"),
    "cuda": ("bfloat16", "float16", "float32"),
}
KERNELS = ("auto", "triton", "torch")
# Prefill pacing's target with CUDA: gaps a reader of a stream does not see as a stall, and
# on an H100 above the 2,048-token default budget's ~96 ms steps of an 8B model (so it binds
# only where steps get longer: a larger budget, a slower device, a larger model). "auto" (3x
# the decode step) cost 31 % of the throughput there (docs/benchmarks.md).
DEFAULT_TARGET_ITL_MS = 100.0


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A settings field with its command-line flag described beside it: `help`, and where the
    flag needs them `choices`, `metavar`, `flag` (a spelling other than --field-name),
    `aliases`, ... (server/cli.py lists them). A field declared without it has no flag."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def _own_protect_recent() -> str:
    """The built-in policies' own recency protection, as the help states it ("tova: 0.5, ...")."""
    return ", ".join(f"{policy.name}: {policy.protect_recent}"
                     for policy in POLICIES.values() if policy.protects_recent)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    # None: the embedded default model.
    model: str | None = setting(
        None, "Hugging Face folder, hub id, .gguf file or config .json (dummy); default: the "
              "embedded SmolLM2-135M-Instruct")
    load_format: str = setting(
        "auto", "auto: safetensors when the folder has them, else GGUF; dummy: random weights "
                "with the model's shapes", choices=LOAD_FORMATS)
    dtype: str = setting("auto", "auto: bfloat16 on CUDA, float32 on CPU",
                         choices=("auto", *DTYPES))
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    # None: the checkpoint's (an FP8 checkpoint runs in FP8), else the dtype's.
    quantization: str | None = setting(
        None, "fp8: the projections' weights in 8-bit floats, a scale per output channel and "
              "per token (GPUs with FP8 matmuls, compute capability 8.9+; CPU emulated); "
              "default: the checkpoint's (FP8 checkpoints load as FP8), else none",
        choices=QUANTIZATIONS)
    # The fixed memory every request gets.
    state_size: int = setting(512, "key/value entries per layer per sequence")
    # How the state stores K and V (state/fp8_buffer.py).
    kv_cache_dtype: str = setting(
        "auto", "auto: K/V in --dtype; fp8: in float8 e4m3 with a scale per head vector (half "
                "of bfloat16's bytes: twice the slots at equal memory)",
        choices=KV_CACHE_DTYPES)
    # A built-in policy's name, or a declared `Policy` (state/policies.py). (`setting` makes
    # a dataclasses.Field, which ruff cannot tell from a shared mutable default.)
    policy: str | Policy = setting(  # noqa: RUF009
        "tova", "which entry a full state drops", choices=tuple(POLICIES))
    # None: the policy's own. Requests may set their own (SamplingParams).
    protect_recent: int | float | None = setting(
        None, "the latest R positions are never evicted: a count (64) or a fraction of the "
              "state size (0.25); default: the policy's own "
              f"({_own_protect_recent()}; 0 is the paper's TOVA)", metavar="R")
    # "auto" is resolved by tova_engine.execution.memory.resolve_config once the weights are
    # loaded.
    max_num_seqs: int | Literal["auto"] = setting(
        64, "state slots: choices that run at once; auto: as many as --memory-utilization "
            "allows", metavar="N|auto")
    # CUDA: of the device's total memory.
    memory_utilization: float = setting(
        0.9, "with --max-num-seqs auto: the share of the GPU's memory (CPU: of the RAM "
             "available at start-up) that weights, state and activations may take")
    # Eviction happens between chunks.
    prefill_chunk_size: int = setting(512, "prompt tokens one sequence prefills per step")
    # None: sized from the above (`token_budget_for`).
    max_num_batched_tokens: int | None = setting(
        None, "tokens (decodes + prefill chunks) one step may run; default: "
              "max(2048, max-num-seqs + prefill-chunk-size)")
    max_model_len: int | None = setting(
        None, "longest prompt + output a request may ask for; default: the model's position "
              "limit")
    seed: int = setting(0, "seed of the sampler for requests without their own")
    # "auto": on CUDA the fused Triton kernels (decode attention + eviction, RMSNorm, RoPE,
    # SwiGLU) when Triton is installed, PyTorch otherwise.
    kernels: str = setting(
        "auto", "auto: fused Triton kernels on CUDA when available; torch: PyTorch",
        choices=KERNELS)
    enforce_eager: bool = setting(
        False, "CUDA: run every step eagerly, no captured decode or prefill graphs")
    # A batch is padded to the next size; larger ones run eagerly.
    cuda_graph_batch_sizes: tuple[int, ...] | None = setting(
        None, "CUDA: decode batch sizes to capture; default: 1, 2, 4, 8, then every 16 up to "
              "max-num-seqs")
    # Megatron-style; on CPU (gloo) one process per rank.
    tensor_parallel_size: int = setting(
        1, "split the model over this many devices (processes; one GPU each on CUDA); must "
           "divide the model's key/value heads", aliases=("-tp",))
    # Ranks that exit or raise while starting end the start at once, whatever this says
    # (execution/ranks/start.py); this bounds a rank that hangs instead: its start (spawn to
    # its first report), forming the group, and any collective waiting for it (rank 0's plans
    # travel over pipes, never a collective, so an idle engine waits without limit).
    distributed_timeout_seconds: float = setting(
        60, "tensor parallelism: how long a starting rank, forming the group or a collective "
            "may take before failing (a rank that fails or exits ends the start at once)",
        metavar="S")
    # The least recently used graph goes first.
    max_prefill_graphs: int = setting(
        16, "CUDA: prefill chunk shapes that recur (rows, length, entries before the chunk) "
            "are captured in graphs, this many at most (the full chunks' at start-up); 0: "
            "prefill eagerly")
    # Saved states (keep_state, the Responses API's stored responses): host memory (page-locked
    # on CUDA) caching a directory that every state is written to (state/store.py).
    state_store_memory_bytes: int = setting(
        4 * 2**30, "host memory for saved states (stored responses), the least recently used "
                   "going first (with --state-store-dir, a cache of its files)")
    state_store_dir: str | None = setting(
        None, "directory every saved state is written to: it survives restarts, and replicas "
              "that mount the same one continue each other's conversations (default: none, "
              "host memory only)")
    state_store_disk_bytes: int = setting(
        64 * 2**30, "disk space for saved states (on a directory replicas share, each counts "
                    "the files it wrote or used); the least recently used are deleted")
    # None: on with CUDA, off on CPU (where nothing runs concurrently to overlap with),
    # resolved when the engine is built (execution.executor.resolve_device).
    async_scheduling: bool | None = setting(
        None, "launch each engine step before the previous one is read back, so host work "
              "overlaps the device's (default: on with CUDA, off on CPU)")
    # Cached prompt-prefix states (core/prefix_cache.py): rows of the state beside the slots.
    prefix_cache_bytes: int | None = setting(
        None, "device memory for the states of prompt prefixes that later prompts start with "
              "(restored instead of prefilled again, outputs unchanged); default: on one GPU "
              "what --memory-utilization leaves beside the slots, else (CPU, tensor "
              "parallelism) 1/16 of the slots' state memory; 0: off")
    # None: DEFAULT_TARGET_ITL_MS with CUDA, 0 on CPU (execution.executor.resolve_device).
    # The pacing: core/prefill_pacer.py.
    target_itl_ms: float | Literal["auto"] | None = setting(
        None, "a step that prefills beside running streams lasts about this long (their "
              "inter-token latency): its prompt tokens are paced, at least one chunk a step; "
              "auto: 3x the measured decode step; 0: no target (--max-num-batched-tokens "
              "alone); default: 100 with CUDA, 0 on CPU", metavar="MS|auto")

    def __post_init__(self) -> None:
        if not isinstance(self.policy, Policy):
            require_choice("policy", self.policy, tuple(POLICIES))
        make_policy(self.policy, self.protect_recent)  # protect_recent fits the policy
        require_choice("load_format", self.load_format, LOAD_FORMATS)
        require_choice("dtype", self.dtype, ("auto", *DTYPES))
        require_choice("kernels", self.kernels, KERNELS)
        if self.quantization is not None:
            require_choice("quantization", self.quantization, QUANTIZATIONS)
        require_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(
                f"async_scheduling must be a bool or None; got {self.async_scheduling!r}"
            )
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool; got {self.enforce_eager!r}")
        if self.target_itl_ms not in (None, "auto") and not (
            isinstance(self.target_itl_ms, (int, float))
            and not isinstance(self.target_itl_ms, bool)
            and 0 <= self.target_itl_ms < float("inf")
        ):
            raise ValueError(
                f"target_itl_ms must be a number of milliseconds >= 0, 'auto' or None; "
                f"got {self.target_itl_ms!r}"
            )
        require_count("state_store_memory_bytes", self.state_store_memory_bytes)
        if self.prefix_cache_bytes is not None:
            require_count("prefix_cache_bytes", self.prefix_cache_bytes)
        require_count("state_store_disk_bytes", self.state_store_disk_bytes)
        require_positive_int("tensor_parallel_size", self.tensor_parallel_size)
        if self.tensor_parallel_size > 1 and self.torch_device.index not in (None, 0):
            raise ValueError(
                f"device {self.device!r}: with tensor_parallel_size > 1 rank r runs on cuda:r; "
                "choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if self.tensor_parallel_size > 1 and self.torch_device.type == "cuda":
            visible = torch.cuda.device_count()
            if self.tensor_parallel_size > visible:
                raise ValueError(
                    f"tensor_parallel_size ({self.tensor_parallel_size}) exceeds the visible "
                    f"GPUs ({visible})"
                )
        if not (is_finite_number(self.distributed_timeout_seconds)
                and self.distributed_timeout_seconds > 0):
            raise ValueError("distributed_timeout_seconds must be a number of seconds > 0; got "
                             f"{self.distributed_timeout_seconds!r}")
        require_count("max_prefill_graphs", self.max_prefill_graphs)
        if self.cuda_graph_batch_sizes is not None:
            sizes = self.cuda_graph_batch_sizes
            if not isinstance(sizes, (tuple, list)) or not sizes:
                raise ValueError(
                    f"cuda_graph_batch_sizes must be a non-empty tuple of integers; got {sizes!r}"
                )
            for size in sizes:
                require_positive_int("cuda_graph_batch_sizes entries", size)
                # "auto" checks the bound when it resolves (memory.resolve_config).
                if self.max_num_seqs != "auto" and size > self.max_num_seqs:
                    raise ValueError(
                        f"cuda_graph_batch_sizes entries must not exceed max_num_seqs "
                        f"({self.max_num_seqs}); got {size}"
                    )
        require_positive_int("state_size", self.state_size)
        if self.max_num_seqs != "auto" and not is_positive_int(self.max_num_seqs):
            raise ValueError(
                f"max_num_seqs must be an integer >= 1 or 'auto'; got {self.max_num_seqs!r}"
            )
        require_fraction("memory_utilization", self.memory_utilization)
        require_positive_int("prefill_chunk_size", self.prefill_chunk_size)
        if self.max_model_len is not None:
            require_positive_int("max_model_len", self.max_model_len)
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < (
            1 if self.max_num_seqs == "auto" else self.max_num_seqs
        ):
            raise ValueError(
                "max_num_batched_tokens must be at least max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence decodes each step; "
                f"got {self.max_num_batched_tokens}"
            )
        device = self.torch_device  # validates the device string
        allowed = DTYPES_BY_DEVICE[device.type]
        if self.dtype != "auto" and self.dtype not in allowed:
            raise ValueError(
                f"dtype {self.dtype!r} is not supported on {device.type}; use one of {allowed}"
            )
        if self.kernels == "triton" and not self.triton_kernels:
            raise ValueError("kernels='triton' needs a CUDA device and the triton package")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(
                f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {self.device!r}"
            ) from exc
        if device.type not in DTYPES_BY_DEVICE:
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for but CUDA is not available")
        return device

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    @property
    def triton_kernels(self) -> bool:
        """Whether the fused Triton kernels run (CUDA with Triton, unless kernels='torch')."""
        return self.kernels != "torch" and triton_available(self.torch_device)

    @property
    def use_cuda_graphs(self) -> bool:
        """Decode steps replay CUDA graphs: CUDA, the Triton kernels, not enforce_eager."""
        return self.torch_device.type == "cuda" and self.triton_kernels and not self.enforce_eager

    @property
    def graph_batch_sizes(self) -> tuple[int, ...]:
        if self.cuda_graph_batch_sizes is not None:
            return tuple(sorted(set(self.cuda_graph_batch_sizes)))
        slots = self.num_slots
        sizes = {s for s in (1, 2, 4, 8) if s < slots}
        return tuple(sorted(sizes | set(range(16, slots, 16)) | {slots}))

    @property
    def batched_token_budget(self) -> int:
        return self.token_budget_for(self.num_slots)

    def token_budget_for(self, slots: int) -> int:
        """Tokens one step may process when max_num_seqs is `slots`."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return max(2048, slots + self.prefill_chunk_size)

    @property
    def num_slots(self) -> int:
        """max_num_seqs as an int; "auto" must have been resolved (memory.resolve_config)."""
        if self.max_num_seqs == "auto":
            raise ValueError(
                "max_num_seqs='auto' is resolved once the model is loaded: use the engine's "
                "config (tova_engine.execution.memory.resolve_config), not the one it was given"
            )
        return self.max_num_seqs

    def prefix_cache_rows(self, slots: int, slot_bytes: int) -> int:
        """State rows that hold cached prefix states beside `slots` slots of `slot_bytes`."""
        if self.prefix_cache_bytes is None:
            return slots // 16
        return self.prefix_cache_bytes // slot_bytes

    def replace(self, **changes: object) -> EngineConfig:
        return dataclasses.replace(self, **changes)

