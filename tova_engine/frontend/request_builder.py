"""From (prompt, SamplingParams) to a validated request: what the core runs (`CoreRequest`)
and what the front end keeps to turn its tokens into outputs (`RequestState`).

Everything here runs before the request reaches the core and touches no engine state, so
bad input is refused before anything is queued. Errors name their parameter as data
(`InvalidRequestError.param`).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from tova_engine.core.messages import EngineInfo
from tova_engine.errors import InvalidRequestError
from tova_engine.frontend.detokenizer import IncrementalDetokenizer
from tova_engine.frontend.output_processor import RequestState, SequenceState
from tova_engine.outputs import RequestMetrics
from tova_engine.sampling_params import SamplingParams
from tova_engine.state.policies import check_request_protect_recent
from tova_engine.state.snapshots import StateSnapshot
from tova_engine.state.store import SavedState
from tova_engine.step.request import CoreRequest


class PreparedRequest(NamedTuple):
    core: CoreRequest
    state: RequestState
    # In process only (`LLM`): the state to continue from, handed to the core as an object.
    resume: StateSnapshot | None = None

    @property
    def request_id(self) -> str:
        return self.core.request_id


class RequestBuilder:
    def __init__(self, tokenizer: Any, info: EngineInfo) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = info.vocab_size
        self.max_model_len = info.max_model_len
        self.state_size = info.state_size
        self.max_num_seqs = info.max_num_seqs
        self.policy_evicts = info.policy_evicts
        self.policy = info.policy
        self.policy_protects_recent = info.policy_protects_recent

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError(
                "prompt", "prompt must be token ids: this model was loaded without a tokenizer"
            )
        return self.tokenizer.encode(prompt)

    def build(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        resume: SavedState | None = None,
    ) -> PreparedRequest:
        """resume: continue from this stored state (its tokens count towards the length
        limit: positions go on from where it stopped)."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                "sampling_params",
                f"sampling_params must be SamplingParams, got {type(params).__name__}",
            )
        text, token_ids = self._prompt_ids(prompt)
        self._check_protect_recent(params)
        capacity = self._capacity(params)
        if resume is not None and params.n != 1:
            raise InvalidRequestError("n", f"continuing a stored state needs n = 1, got {params.n}")
        before = 0 if resume is None else resume.num_tokens
        max_tokens = self._max_tokens(params, before + len(token_ids), capacity)
        state = RequestState(
            request_id, text, token_ids, params, [], RequestMetrics(arrival_time or time.time())
        )
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]  # the first token has nothing before it
        state.sequences = [self._new_sequence(state, i) for i in range(params.n)]
        core = CoreRequest(
            request_id, token_ids, params, capacity, max_tokens,
            None if resume is None else resume.key,
        )
        return PreparedRequest(core, state)

    def _prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "prompt must not be empty")
            return prompt, self.tokenize(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt", "prompt must not be empty")
        vocab = self.vocab_size
        for token in ids:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise InvalidRequestError(
                    "prompt", f"prompt token ids must be integers in [0, {vocab}); got {token!r}"
                )
        return None, ids

    def _check_protect_recent(self, params: SamplingParams) -> None:
        if params.protect_recent is not None:
            check_request_protect_recent(
                params.protect_recent, self.policy, self.policy_evicts, self.policy_protects_recent
            )

    def _capacity(self, params: SamplingParams) -> int:
        if params.state_size is None:
            return self.state_size
        if params.state_size > self.state_size:
            raise InvalidRequestError(
                "state_size",
                f"state_size ({params.state_size}) must not exceed the engine's "
                f"({self.state_size})"
            )
        return params.state_size

    def _max_tokens(self, params: SamplingParams, prompt_len: int, capacity: int) -> int:
        if params.n > self.max_num_seqs:
            raise InvalidRequestError(
                "n", f"n ({params.n}) must not exceed max_num_seqs ({self.max_num_seqs})"
            )
        if prompt_len >= self.max_model_len and params.max_tokens != 0:
            raise InvalidRequestError(
                "prompt",
                f"prompt is {prompt_len} tokens; the length limit is {self.max_model_len} "
                "(prompt + max_tokens)"
            )
        room = self.max_model_len - prompt_len
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if params.max_tokens is None and not self.policy_evicts:
            # Without eviction the state is the context: "as many as fit" means up to S.
            max_tokens = min(room, max(capacity - prompt_len, 1))
        if max_tokens > room:
            raise InvalidRequestError(
                "max_tokens",
                f"max_tokens ({max_tokens}) + prompt ({prompt_len} tokens) exceeds the length "
                f"limit of {self.max_model_len}"
            )
        if not self.policy_evicts and prompt_len + max_tokens > capacity:
            raise InvalidRequestError(
                "max_tokens",
                f"policy 'full' never evicts: prompt ({prompt_len} tokens) + max_tokens "
                f"({max_tokens}) exceeds state_size ({capacity})"
            )
        return max_tokens

    def _new_sequence(self, request: RequestState, index: int) -> SequenceState:
        params = request.params
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_token_ids,
                params.skip_special_tokens,
                params.spaces_between_special_tokens,
                params.stop,
                params.min_tokens,
            )
        return SequenceState(index, detokenizer, [] if params.logprobs is not None else None)
