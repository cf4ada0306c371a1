"""Engine configuration: one frozen dataclass, validated on construction. The CLI reads its
defaults from here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tova_engine.kernels import triton_available
from tova_engine.policies import POLICIES, Policy, make_policy

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


@dataclass(frozen=True, slots=True)
class EngineConfig:
    # Hugging Face folder, hub id, .gguf file, or config .json (dummy); None = embedded default.
    model: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    # Entries per layer per sequence: the fixed memory every request gets.
    state_size: int = 512
    # A built-in policy's name, or a declared `Policy` (policies.py).
    policy: str | Policy = "tova"
    # The latest positions never evicted: a count, or a fraction of the state size; None =
    # the policy's own (tova 0, h2o 0.5). Requests may set their own (SamplingParams).
    protect_recent: int | float | None = None
    # State slots (sequences that run at once), or "auto": as many as memory_utilization
    # allows, resolved by tova_engine.memory.resolve_config once the weights are loaded.
    max_num_seqs: int | str = 64
    # Fraction of the device's memory (CUDA: total; CPU: RAM available at start-up) that the
    # weights, the state and the step's activations may take when max_num_seqs="auto".
    memory_utilization: float = 0.9
    # Prompt tokens one sequence prefills per step; eviction happens between chunks.
    prefill_chunk_size: int = 512
    # Tokens (decodes plus prefill chunks) one step may process; None = sized from the above.
    max_num_batched_tokens: int | None = None
    # Longest prompt + output a request may ask for; None = the model's position limit.
    max_model_len: int | None = None
    seed: int = 0
    # "auto": on CUDA the fused Triton kernels (decode attention + eviction, RMSNorm, RoPE,
    # SwiGLU) when Triton is installed, PyTorch otherwise; "torch": PyTorch everywhere.
    kernels: str = "auto"
    # CUDA: run every step eagerly instead of replaying captured decode graphs.
    enforce_eager: bool = False
    # CUDA: decode batch sizes to capture (None: 1, 2, 4, 8, then every 16 up to
    # max_num_seqs); a batch is padded to the next size, larger ones run eagerly.
    cuda_graph_batch_sizes: tuple[int, ...] | None = None
    # Devices (processes) the model is split over, Megatron-style: it must divide the model's
    # key/value heads; on CUDA one GPU per rank, on CPU (gloo) one process per rank.
    tensor_parallel_size: int = 1
    # CUDA: prefill chunk shapes that recur are captured in graphs, this many at most (least
    # recently used out first); 0 = every prefill runs eagerly.
    max_prefill_graphs: int = 16
    # Saved states (keep_state, the Responses API's stored responses): host memory for them
    # (page-locked on CUDA), then a directory they spill to and survive restarts in.
    state_store_memory_bytes: int = 4 * 2**30
    state_store_dir: str | None = None
    state_store_disk_bytes: int = 64 * 2**30
    # Launch step N+1 before reading step N back, so the host's work overlaps the device's.
    # None: on with CUDA, off on CPU (where nothing runs concurrently to overlap with).
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.policy, Policy):
            _require_choice("policy", self.policy, tuple(POLICIES))
        make_policy(self.policy, self.protect_recent)  # protect_recent fits the policy
        _require_choice("load_format", self.load_format, LOAD_FORMATS)
        _require_choice("dtype", self.dtype, ("auto", *DTYPES))
        _require_choice("kernels", self.kernels, KERNELS)
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(
                f"async_scheduling must be a bool or None; got {self.async_scheduling!r}"
            )
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool; got {self.enforce_eager!r}")
        for name in ("state_store_memory_bytes", "state_store_disk_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
        _require_positive("tensor_parallel_size", self.tensor_parallel_size)
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
        if not isinstance(self.max_prefill_graphs, int) or self.max_prefill_graphs < 0:
            raise ValueError(
                f"max_prefill_graphs must be an integer >= 0; got {self.max_prefill_graphs!r}"
            )
        if self.cuda_graph_batch_sizes is not None:
            sizes = self.cuda_graph_batch_sizes
            if not isinstance(sizes, (tuple, list)) or not sizes:
                raise ValueError(
                    f"cuda_graph_batch_sizes must be a non-empty tuple of integers; got {sizes!r}"
                )
            for size in sizes:
                _require_positive("cuda_graph_batch_sizes entries", size)
                # "auto" checks the bound when it resolves (memory.resolve_config).
                if self.max_num_seqs != "auto" and size > self.max_num_seqs:
                    raise ValueError(
                        f"cuda_graph_batch_sizes entries must not exceed max_num_seqs "
                        f"({self.max_num_seqs}); got {size}"
                    )
        _require_positive("state_size", self.state_size)
        if self.max_num_seqs != "auto" and not _is_positive_int(self.max_num_seqs):
            raise ValueError(
                f"max_num_seqs must be an integer >= 1 or 'auto'; got {self.max_num_seqs!r}"
            )
        _require_fraction("memory_utilization", self.memory_utilization)
        _require_positive("prefill_chunk_size", self.prefill_chunk_size)
        if self.max_model_len is not None:
            _require_positive("max_model_len", self.max_model_len)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
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
    def overlap_steps(self) -> bool:
        """Whether the engine core launches a step before reading the previous one back."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.torch_device.type == "cuda"

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
                "config (tova_engine.memory.resolve_config), not the one it was given"
            )
        return self.max_num_seqs

    def replace(self, **changes: object) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def _require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _require_fraction(name: str, value: object) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not 0 < value <= 1  # also rejects NaN
    ):
        raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}")


def _require_positive(name: str, value: object) -> None:
    if not _is_positive_int(value):
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
