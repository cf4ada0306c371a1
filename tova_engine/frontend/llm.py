"""Offline batch generation, shaped like vLLM's `LLM`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from tova_engine.config import EngineConfig
from tova_engine.errors import InvalidRequestError
from tova_engine.frontend.llm_engine import LLMEngine
from tova_engine.outputs import RequestOutput
from tova_engine.sampling_params import SamplingParams
from tova_engine.state.snapshots import StateSnapshot

PromptInput = str | list[int]
Message = dict[str, str]


class LLM:
    """Generate from many prompts at once with a fixed-size state per sequence.

    >>> llm = LLM(state_size=256)                       # embedded SmolLM2-135M-Instruct
    >>> out = llm.generate("The capital of France is", SamplingParams(max_tokens=8))
    >>> out[0].outputs[0].text

    With `tensor_parallel_size` > 1 it starts a process per other rank: `close()` them (or
    use it in a `with` block); an engine collected or left open at exit is closed then.
    """

    def __init__(
        self,
        model: str | None = None,
        state_size: int = 512,
        policy: str = "tova",
        dtype: str = "auto",
        device: str = "auto",
        max_num_seqs: int | str = 64,
        prefill_chunk_size: int = 512,
        load_format: str = "auto",
        seed: int = 0,
        **engine_options: object,
    ) -> None:
        config = EngineConfig(
            model=model,
            state_size=state_size,
            policy=policy,
            dtype=dtype,
            device=device,
            max_num_seqs=max_num_seqs,
            prefill_chunk_size=prefill_chunk_size,
            load_format=load_format,
            seed=seed,
            **engine_options,
        )
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        resume_from: StateSnapshot | Sequence[StateSnapshot | None] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of the prompts. A request that fails inside the engine comes
        back with `error` set and finish_reason "error"; the others are unaffected.

        resume_from: a state saved by an earlier request (`SamplingParams(keep_state=True)`
        gives it as `RequestOutput.state`), one per prompt or one for all: each prompt
        continues from it, and only the prompt is prefilled."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        resume_list = _as_resume_list(resume_from, len(prompt_list))
        # Validate every prompt before queueing any, so bad input leaves nothing behind.
        requests = [
            self.engine.build_request(
                str(next(self._ids)),
                prompt,
                dataclasses.replace(params, output_kind="final"),
                resume_from=resume,
            )
            for prompt, params, resume in zip(prompt_list, params_list, resume_list, strict=True)
        ]
        for request in requests:
            self.engine.enqueue(request)
        return self._run([r.request_id for r in requests], use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not tokenizer.chat_template:
            raise ValueError("messages need a tokenizer with a chat template; this model has none")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            list(
                tokenizer.apply_chat_template(
                    c, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks and let their group go, so that another
        tensor-parallel engine can start in this process; closing again does nothing."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="requests", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
                    bar.update(1)
        bar.close()
        return [finished[i] for i in request_ids]


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # a single prompt given as token ids
    if not prompts:
        raise ValueError("prompts must not be empty")
    return prompts


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(
            f"sampling_params must be one SamplingParams or one per prompt ({count}); "
            f"got {len(params)}"
        )
    return params


def _as_resume_list(resume_from, count: int) -> list:
    if resume_from is None or isinstance(resume_from, StateSnapshot):
        return [resume_from] * count
    resume_list = list(resume_from)
    if len(resume_list) != count:
        raise InvalidRequestError(
            "resume_from",
            f"resume_from has {len(resume_list)} entries for {count} prompts",
        )
    return resume_list
