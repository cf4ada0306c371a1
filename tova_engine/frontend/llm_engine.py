"""The in-process engine: the core and the front end's output processing in one loop.

`LLM` (offline) drives it; `AsyncEngine` runs the same core in its own process and the same
output processing on the server's side (`async_engine.py`).
"""

from __future__ import annotations

from collections.abc import Callable

from tova_engine.config import EngineConfig
from tova_engine.core.engine_core import EngineCore
from tova_engine.core.messages import EngineInfo, StepOutputs, StepStats
from tova_engine.errors import InvalidRequestError
from tova_engine.frontend.output_processor import OutputProcessor
from tova_engine.frontend.request_builder import PreparedRequest, RequestBuilder
from tova_engine.outputs import RequestOutput
from tova_engine.sampling_params import SamplingParams
from tova_engine.state.snapshots import StateSnapshot
from tova_engine.state.store import SavedState

StatsCallback = Callable[[StepStats], None]


class LLMEngine:
    def __init__(self, config: EngineConfig, stats_callback: StatsCallback | None = None) -> None:
        self.core = EngineCore(config)
        self.tokenizer = self.core.executor.tokenizer
        self.request_builder = RequestBuilder(self.tokenizer, self.core.info)
        self.outputs = OutputProcessor(self.tokenizer)
        self.stats_callback = stats_callback

    def close(self) -> None:
        """Let go of what the engine started (the other tensor-parallel ranks)."""
        self.core.close()

    @property
    def info(self) -> EngineInfo:
        return self.core.info

    @property
    def config(self) -> EngineConfig:
        return self.core.executor.config

    @property
    def model_name(self) -> str:
        return self.core.info.model_name

    @property
    def max_model_len(self) -> int:
        return self.core.info.max_model_len

    # ----- requests -----------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        return self.request_builder.tokenize(prompt)

    def build_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        resume_from: StateSnapshot | None = None,
    ) -> PreparedRequest:
        """Validate and tokenize without queueing anything."""
        saved = None
        if resume_from is not None:
            if not isinstance(resume_from, StateSnapshot):
                raise InvalidRequestError(
                    "resume_from",
                    f"resume_from must be a StateSnapshot, got {type(resume_from).__name__}",
                )
            saved = SavedState("", resume_from.num_tokens, resume_from.nbytes)
        request = self.request_builder.build(request_id, prompt, params, arrival_time, saved)
        return request._replace(resume=resume_from)

    def enqueue(self, request: PreparedRequest) -> None:
        self.outputs.add(request.state)
        try:
            self.core.add(request.core, request.resume)
        except ValueError:
            self.outputs.abort(request.request_id)
            raise

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> PreparedRequest:
        request = self.build_request(request_id, prompt, params, arrival_time)
        self.enqueue(request)
        return request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its slots are free for the next step."""
        self.core.abort([request_id])
        return self.outputs.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    # ----- stepping -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        step = self.core.step()
        if step is None:
            return []
        processed = self.outputs.process(step)
        outputs = processed.outputs
        saved_states = list(step.saved)
        if processed.stops:  # stop strings: end those choices before the next step
            freed = StepOutputs.empty(step.started_at)
            freed.finished = self.core.abort([], stopped=processed.stops)
            self.core.take_store_updates(freed)  # ended as "stop": a kept state is saved
            saved_states += freed.saved
            outputs += self.outputs.process(freed).outputs
        if self.stats_callback is not None and step.stats is not None:
            self.stats_callback(step.stats)
        for saved in saved_states:  # keep_state: the caller holds the state, not the store
            for output in outputs:
                if output.request_id == saved.key:
                    output.state = self.core.store.pop(saved.key)
        return outputs

    # ----- introspection for tests and benchmarks -----------------------------------------

    @property
    def num_running(self) -> int:
        return self.core.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.core.scheduler.num_waiting

    @property
    def slots_used(self) -> int:
        return self.core.scheduler.slots_used
