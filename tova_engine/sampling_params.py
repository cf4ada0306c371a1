"""Per-request sampling parameters with vLLM semantics, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tova_engine.errors import InvalidRequestError
from tova_engine.state.policies import check_protect_recent
from tova_engine.structured.spec import StructuredOutputs
from tova_engine.validation import is_int, is_number

if TYPE_CHECKING:
    import torch

    # Called with the output token ids so far and the 1-D logits row; returns the logits row.
    LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
else:
    # The server imports this module and must not import torch.
    LogitsProcessor = Callable[[list[int], Any], Any]

# Temperatures below this sample like greedy decoding (as vLLM): dividing by them overflows.
SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20
OUTPUT_KINDS = ("cumulative", "delta", "final")


def _check_int(
    name: str, value: Any, low: int | None = None, high: int | None = None, param: str = ""
) -> None:
    """`param`: the field the error names when `name` describes a part of it."""
    param = param or name
    if not is_int(value):
        raise InvalidRequestError(param, f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise InvalidRequestError(param, f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InvalidRequestError(param, f"{name} must be <= {high}, got {value}")


def _check_float(name: str, value: Any) -> float:
    if not is_number(value):
        raise InvalidRequestError(name, f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidRequestError(name, f"{name} must be finite, got {value}")
    return float(value)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidRequestError(name, f"{name} must be a bool, got {value!r}")


def _normalize_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in items:
        if not isinstance(s, str):
            raise InvalidRequestError("stop", f"stop must hold strings, got {s!r}")
        if not s:
            raise InvalidRequestError("stop", "stop must not contain an empty string")
    return items


def _normalize_ids(name: str, ids: Sequence[int] | None) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (str, bytes)):
        raise InvalidRequestError(name, f"{name} must be a list of ints, got {ids!r}")
    items = tuple(ids)
    for i in items:
        _check_int(f"{name} entries", i, low=0, param=name)
    return items


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample one request. Field meanings follow vLLM's `SamplingParams`.

    Frozen: derive variants with `dataclasses.replace`, which validates again.
    `stop` and `stop_token_ids` are normalised to tuples; `top_k=-1` to 0 (both mean "off").
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    # None: generate up to the model's length limit. 0: only prompt logprobs are computed.
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # The engine checks the upper bound (its configured state buffers).
    state_size: int | None = None
    return_state: bool = False
    # Save the state at the end (n = 1): RequestOutput.state offline, a stored response
    # the next turn continues from in the server.
    keep_state: bool = False
    output_kind: str = "cumulative"
    logits_processors: Sequence[LogitsProcessor] | None = None
    # The output must follow a JSON Schema, a regex, a choice or a grammar (structured/).
    structured_outputs: StructuredOutputs | None = None
    # This request's latest positions never evicted (a count, or a fraction of its state
    # size); None: the engine's.
    protect_recent: int | float | None = None

    def __post_init__(self) -> None:
        self._validate_counts()
        self._validate_floats()
        self._validate_flags()
        self._normalize()

    def _validate_counts(self) -> None:
        _check_int("n", self.n, low=1)
        _check_int("top_k", self.top_k, low=-1)
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=0)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                "min_tokens",
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low=0, high=MAX_LOGPROBS)
        if self.state_size is not None:
            _check_int("state_size", self.state_size, low=1)

    def _validate_floats(self) -> None:
        if _check_float("temperature", self.temperature) < 0:
            raise InvalidRequestError(
                "temperature", f"temperature must be >= 0, got {self.temperature}"
            )
        if not 0 < _check_float("top_p", self.top_p) <= 1:
            raise InvalidRequestError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= _check_float("min_p", self.min_p) <= 1:
            raise InvalidRequestError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise InvalidRequestError(name, f"{name} must be in [-2, 2], got {value}")
        if _check_float("repetition_penalty", self.repetition_penalty) <= 0:
            raise InvalidRequestError(
                "repetition_penalty",
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            )

    def _validate_flags(self) -> None:
        for name in (
            "ignore_eos",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "return_state",
            "keep_state",
        ):
            _check_bool(name, getattr(self, name))
        if self.keep_state and self.n != 1:
            raise InvalidRequestError("n", f"keep_state needs n = 1, got n = {self.n}")
        if self.output_kind not in OUTPUT_KINDS:
            raise InvalidRequestError(
                "output_kind",
                f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}",
            )
        if self.protect_recent is not None:
            check_protect_recent(
                self.protect_recent, lambda message: InvalidRequestError("protect_recent", message)
            )
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputs
        ):
            raise InvalidRequestError(
                "structured_outputs", "structured_outputs must be a StructuredOutputs"
            )
        for proc in self.logits_processors or ():
            if not callable(proc):
                raise InvalidRequestError(
                    "logits_processors", f"logits_processors must hold callables, got {proc!r}"
                )

    def _normalize(self) -> None:
        # frozen: normalising in place needs object.__setattr__.
        object.__setattr__(self, "stop", _normalize_stop(self.stop))
        object.__setattr__(
            self, "stop_token_ids", _normalize_ids("stop_token_ids", self.stop_token_ids)
        )
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.logits_processors is not None:
            object.__setattr__(self, "logits_processors", tuple(self.logits_processors))

    def __reduce__(self) -> tuple:
        # Requests cross to the engine core pickled; the dataclass default walks fields()
        # per object and costs several times this.
        return (SamplingParams, tuple(getattr(self, name) for name in _FIELD_NAMES))

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax (temperature ~0, or top_k == 1)."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1


_FIELD_NAMES = tuple(field.name for field in dataclasses.fields(SamplingParams))
