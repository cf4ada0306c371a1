"""From (prompt, SamplingParams) to a validated `Request` with its sequences.

Everything here runs before the request reaches the scheduler and touches no engine state,
so the server calls it on its own thread and refuses bad input before queueing anything.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tova_engine.detokenizer import IncrementalDetokenizer
from tova_engine.outputs import RequestMetrics
from tova_engine.request import Request, Sequence
from tova_engine.sampler import make_generator
from tova_engine.sampling_params import SamplingParams


class RequestBuilder:
    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int,
        max_model_len: int,
        state_size: int,
        max_num_seqs: int,
        policy_evicts: bool,
        device: torch.device,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.state_size = state_size
        self.max_num_seqs = max_num_seqs
        self.policy_evicts = policy_evicts
        self.device = device

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt must be token ids: this model was loaded without a tokenizer")
        return self.tokenizer.encode(prompt)

    def build(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> Request:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text, token_ids = self._prompt_ids(prompt)
        capacity = self._capacity(params)
        max_tokens = self._max_tokens(params, len(token_ids), capacity)
        request = Request(
            request_id,
            text,
            token_ids,
            params,
            capacity,
            max_tokens,
            [],
            RequestMetrics(arrival_time or time.time()),
        )
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]  # the first token has nothing before it
        request.sequences = [self._new_sequence(request, i) for i in range(params.n)]
        return request

    def _prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenize(prompt)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.vocab_size
        for token in ids:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise ValueError(
                    f"prompt token ids must be integers in [0, {vocab}); got {token!r}"
                )
        return None, ids

    def _capacity(self, params: SamplingParams) -> int:
        if params.state_size is None:
            return self.state_size
        if params.state_size > self.state_size:
            raise ValueError(
                f"state_size ({params.state_size}) must not exceed the engine's "
                f"({self.state_size})"
            )
        return params.state_size

    def _max_tokens(self, params: SamplingParams, prompt_len: int, capacity: int) -> int:
        if params.n > self.max_num_seqs:
            raise ValueError(f"n ({params.n}) must not exceed max_num_seqs ({self.max_num_seqs})")
        if prompt_len >= self.max_model_len and params.max_tokens != 0:
            raise ValueError(
                f"prompt is {prompt_len} tokens; the length limit is {self.max_model_len} "
                "(prompt + max_tokens)"
            )
        room = self.max_model_len - prompt_len
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if params.max_tokens is None and not self.policy_evicts:
            # Without eviction the state is the context: "as many as fit" means up to S.
            max_tokens = min(room, max(capacity - prompt_len, 1))
        if max_tokens > room:
            raise ValueError(
                f"max_tokens ({max_tokens}) + prompt ({prompt_len} tokens) exceeds the length "
                f"limit of {self.max_model_len}"
            )
        if not self.policy_evicts and prompt_len + max_tokens > capacity:
            raise ValueError(
                f"policy 'full' never evicts: prompt ({prompt_len} tokens) + max_tokens "
                f"({max_tokens}) exceeds state_size ({capacity})"
            )
        return max_tokens

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        params = request.params
        generator = None
        if params.seed is not None:
            generator = make_generator(params.seed, index, self.device)
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
        seq = Sequence(request, index, generator, detokenizer)
        if params.logprobs is not None:
            seq.logprobs = []
        return seq
