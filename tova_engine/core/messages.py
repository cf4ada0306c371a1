"""Typed messages between the front end and the engine core, and their wire format.

The core speaks token ids only: the front end tokenizes, detokenizes and watches stop
strings. One `StepOutputs` carries everything a step produced for every sequence, as
columns, so a step costs one message whatever the batch size. In-process (`LLMEngine`) the
same structs pass as objects; across the process boundary they travel as msgpack (msgspec),
and `SamplingParams` as a pickle, because a request's logits processors are callables.
"""

from __future__ import annotations

import pickle

import msgspec

from tova_engine.state.snapshots import SnapshotSpec
from tova_engine.state.store import SavedState, StoreStats
from tova_engine.step.request import CoreRequest


class EngineInfo(msgspec.Struct, frozen=True):
    """What the core tells the front end once its model is loaded and its state allocated."""

    model_name: str
    max_model_len: int
    vocab_size: int
    state_size: int
    max_num_seqs: int
    policy: str
    policy_evicts: bool
    # Whether a request's protect_recent means anything to the policy (it evicts by score).
    policy_protects_recent: bool
    dtype: str
    device: str
    state_bytes_per_sequence: int
    state_total_bytes: int
    eos_token_ids: list[int]
    # K/V bytes per sequence by layer kind: "global" (state_size entries) and "local"
    # (sliding-window layers, at most their window); local is 0 for models without them.
    state_bytes_by_layer_kind: dict[str, int] = msgspec.field(default_factory=dict)
    # What the local layers' windows save per sequence against holding state_size entries.
    state_bytes_saved_per_sequence: int = 0
    # State rows beside the slots that hold cached prompt-prefix states, and their bytes
    # (not in state_total_bytes).
    prefix_cache_rows: int = 0
    prefix_cache_bytes: int = 0
    # The weights' quantization ("fp8": the projections in float8), "none": the dtype's.
    quantization: str = "none"
    # How the state stores K/V: "auto" (the dtype) or "fp8" (float8 with scales).
    kv_cache_dtype: str = "auto"

    def snapshot_spec(self, capacity: int) -> SnapshotSpec:
        """What a state saved by this engine for a request of `capacity` entries records, and
        what a state must match to continue here: the one place a spec is assembled."""
        return SnapshotSpec(self.model_name, self.dtype, self.state_size, capacity, self.policy,
                            self.kv_cache_dtype)


class SequenceRef(msgspec.Struct, array_like=True, frozen=True):
    request_id: str
    index: int


class SequenceFinish(msgspec.Struct, array_like=True):
    """A choice the core has finished (and whose slot it has freed)."""

    request_id: str
    index: int
    reason: str  # "stop" | "length" | "abort" | "error"
    stop_reason: int | None = None  # the stop token id, when one ended it
    # With return_state: per layer, the absolute positions the state held at the end.
    state_positions: list[list[int]] | None = None


class PromptLogprobs(msgspec.Struct, array_like=True):
    """Log-probs of prompt tokens `first`, `first + 1`, ... computed this step."""

    request_id: str
    first: int
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


class RequestFailure(msgspec.Struct, array_like=True):
    request_id: str
    message: str


class StepStats(msgspec.Struct, array_like=True):
    """What one step did, and the scheduler's counts after it, for metrics."""

    phase: str  # "prefill" when the step ran any prompt tokens, else "decode"
    duration_s: float
    batch_size: int  # sequences that ran this step
    prompt_tokens: int
    generation_tokens: int
    evicted_ages: list[int]  # per evicted entry: how many tokens back it was
    num_running: int
    num_waiting: int
    slots_used: int
    # Prompt tokens of the prompts that looked the prefix cache up this step (at their first
    # chunk), those restored from it instead of prefilled, and the cache's rows in use.
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_rows_used: int = 0
    # The prompt tokens the latest scheduled step could take (the paced budget, or the whole).
    prompt_token_budget: int = 0
    # Across the process boundary the ages travel binned (core/eviction_ages.py): per 1-2-5
    # bucket up to max_model_len, then +Inf, how many; and their sum.
    evicted_age_counts: list[int] = []
    evicted_age_sum: float = 0.0

    @property
    def evicted_count(self) -> int:
        """Entries evicted this step, whichever form the ages are in."""
        return len(self.evicted_ages) or sum(self.evicted_age_counts)


class StepOutputs(msgspec.Struct, tag="step", array_like=True):
    """One step's results. Row i of the sampled columns is one token of one choice."""

    started_at: float  # wall clock (time.time()) when the step began
    admitted: list[str]  # requests that took their slots this step
    request_ids: list[str]
    indexes: list[int]
    token_ids: list[int]
    # Present when some row asked for logprobs: every row's chosen log-prob and rank.
    logprobs: list[float] | None = None
    ranks: list[int] | None = None
    # Present when some row asked for top alternatives: k = the largest k asked.
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    finished: list[SequenceFinish] = []
    prompt_logprobs: list[PromptLogprobs] = []
    failed: list[RequestFailure] = []
    stats: StepStats | None = None
    # States saved this step (keep_state), and stored ones that left the store.
    saved: list[SavedState] = []
    dropped: list[str] = []
    store: StoreStats | None = None  # the state store's figures, when they changed
    # Request id -> prompt tokens restored from the prefix cache this step.
    cached_tokens: dict[str, int] = {}

    @classmethod
    def empty(cls, started_at: float) -> StepOutputs:
        return cls(started_at, [], [], [], [])


# ----- the wire ---------------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: bytes  # pickled SamplingParams
    capacity: int
    max_tokens: int
    resume_key: str | None = None
    client: int = 0  # the front end that sent it: where its outputs go

    @classmethod
    def of(cls, request: CoreRequest, client: int = 0) -> AddRequest:
        return cls(
            request.request_id,
            request.prompt_token_ids,
            pickle.dumps(request.params, protocol=pickle.HIGHEST_PROTOCOL),
            request.capacity,
            request.max_tokens,
            request.resume_key,
            client,
        )

    def to_request(self) -> CoreRequest:
        params = pickle.loads(self.params)  # bytes from this process's own front end
        return CoreRequest(
            self.request_id,
            self.prompt_token_ids,
            params,
            self.capacity,
            self.max_tokens,
            self.resume_key,
        )


class Abort(msgspec.Struct, tag="abort", array_like=True):
    """Stop whole requests (the client left), single choices (a stop string appeared) or
    every request of a front-end process that died (`clients`, from its supervisor).
    `finished`: choices the front end has all it needs of (a response's tool calls): they
    end as "stop", as if the model had, so a kept state is saved."""

    requests: list[str] = []
    sequences: list[SequenceRef] = []
    clients: list[int] = []
    finished: list[SequenceRef] = []


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class DropStates(msgspec.Struct, tag="drop", array_like=True):
    """Delete stored states (a deleted response)."""

    keys: list[str]


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """A front end that attached to a running core asks for its `CoreReady`."""

    client: int


class CoreReady(msgspec.Struct, tag="ready", array_like=True):
    info: EngineInfo
    tokenizer: bytes  # pickled tokenizer (b"" when the model has none)
    stored: list[SavedState] = []  # states the store holds already (its disk tier)
    input_address: str = ""  # where this core generation takes its messages
    pid: int = 0  # the core process


class CoreFailed(msgspec.Struct, tag="failed", array_like=True):
    """The core could not start, or its loop died; the process exits after sending it."""

    message: str
    during_startup: bool


class CoreLost(msgspec.Struct, tag="lost", array_like=True):
    """From the supervisor of a core shared by several front ends: the core died (`final`:
    and will not be restarted). A restarted core announces itself with `CoreReady`."""

    reason: str
    final: bool = False


ToCore = AddRequest | Abort | Shutdown | DropStates | Hello
FromCore = CoreReady | StepOutputs | CoreFailed | CoreLost


class Wire:
    """msgpack encoders/decoders for both directions (one per thread: they are not shared)."""

    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.to_core = msgspec.msgpack.Decoder(ToCore)
        self.from_core = msgspec.msgpack.Decoder(FromCore)
