"""The synchronous engine: requests in, one scheduled step at a time, outputs out.

`LLM` (offline) drives it in a loop; `AsyncEngine` drives it from its own thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from tova_engine.config import EngineConfig
from tova_engine.cuda_graphs import DecodeGraphs
from tova_engine.fused_attention import fused_policy_supported
from tova_engine.loader import load_source
from tova_engine.logprobs import LogprobBuilder
from tova_engine.model.llama import LlamaModel
from tova_engine.outputs import RequestOutput
from tova_engine.policies import make_policy
from tova_engine.request import Request, Sequence, request_output
from tova_engine.request_builder import RequestBuilder
from tova_engine.runner import ModelRunner, SampledTokens, requests_of
from tova_engine.sampler import Sampler
from tova_engine.sampling_params import SamplingParams
from tova_engine.scheduler import Scheduler, SchedulerOutput
from tova_engine.state import KVState

logger = logging.getLogger("tova_engine")


class StepStats(NamedTuple):
    """What one step did, for metrics."""

    phase: str  # "prefill" when the step ran any prompt tokens, else "decode"
    duration_s: float
    batch_size: int  # sequences that ran this step
    prompt_tokens: int
    generation_tokens: int
    evicted_ages: list[int]  # per evicted entry: how many tokens back it was
    finished: list[RequestOutput]


StatsCallback = Callable[[StepStats], None]


class LLMEngine:
    def __init__(self, config: EngineConfig, stats_callback: StatsCallback | None = None) -> None:
        self.config = config
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        source = load_source(config.model, config.load_format, self.dtype)
        self.model_config = source.config
        self.model_name = source.name
        self.tokenizer = source.tokenizer
        self.logprob_builder = LogprobBuilder(self.tokenizer)
        self.max_model_len = self._resolve_max_model_len()
        self.policy = make_policy(config.policy)
        # The fused kernels implement the built-in policies; a custom one runs in PyTorch.
        fused = config.triton_kernels and fused_policy_supported(self.policy)
        self.model = self._build_model(source.weights, fused)
        use_graphs = fused and config.use_cuda_graphs
        self.state = KVState(
            self.model_config,
            config.max_num_seqs,
            config.state_size,
            self.dtype,
            self.device,
            track_stats=self.policy.uses_stats,
            pad_slot=use_graphs,
        )
        self.eos_token_ids = self._eos_token_ids()
        graphs = None
        if use_graphs:
            graphs = DecodeGraphs(self.model, self.state, self.policy, config.graph_batch_sizes)
        self.runner = ModelRunner(
            self.model,
            self.state,
            self.policy,
            Sampler(config.seed, self.device),
            self.eos_token_ids,
            fused_attention=fused,
            graphs=graphs,
        )
        self.scheduler = Scheduler(
            config.max_num_seqs, config.batched_token_budget, config.prefill_chunk_size
        )
        self.request_builder = RequestBuilder(
            self.tokenizer,
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len,
            state_size=config.state_size,
            max_num_seqs=config.max_num_seqs,
            policy_evicts=self.policy.evicts,
            device=self.device,
        )
        self.stats_callback = stats_callback
        self._requests: dict[str, Request] = {}
        self._log_startup()

    # ----- set-up -------------------------------------------------------------------------

    def _resolve_max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        wanted = self.config.max_model_len or limit
        if wanted > limit:
            logger.warning(
                "max_model_len %d exceeds the model's %d positions; quality past them is untested",
                wanted,
                limit,
            )
        if self.config.state_size > wanted:
            raise ValueError(
                f"state_size ({self.config.state_size}) must not exceed the model's length "
                f"limit ({wanted} positions)"
            )
        return wanted

    def _build_model(self, weights, fused_kernels: bool) -> LlamaModel:
        model = LlamaModel.empty(self.model_config, self.device, self.dtype)
        if weights is None:
            model.init_random_weights(self.config.seed)
        else:
            model.load_hf_weights(weights)
        model.requires_grad_(False)
        if fused_kernels:
            model.use_triton_kernels()
        return model.eval()

    def _eos_token_ids(self) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    @property
    def state_bytes_per_sequence(self) -> int:
        return KVState.bytes_per_sequence(self.model_config, self.config.state_size, self.dtype)

    def _log_startup(self) -> None:
        per_seq = self.state_bytes_per_sequence
        logger.info(
            "model %s on %s (%s); policy %s, state_size %d: state memory %.2f MiB per request, "
            "%.2f MiB for %d slots",
            self.model_name,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.config.policy,
            self.config.state_size,
            per_seq / 2**20,
            self.state.total_bytes() / 2**20,
            self.config.max_num_seqs,
        )

    # ----- requests -----------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        return self.request_builder.tokenize(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> Request:
        request = self.build_request(request_id, prompt, params, arrival_time)
        self.enqueue(request)
        return request

    def build_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> Request:
        """Validate and tokenize without touching the scheduler (safe from another thread)."""
        return self.request_builder.build(request_id, prompt, params, arrival_time)

    def enqueue(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self._requests[request.request_id] = request
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its slots are free for the next step."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        for seq in request.live_sequences():
            seq.finish_reason = "abort"
        self._release_finished(request)
        return request_output(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----- stepping -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if scheduled.empty:
            return []
        started = time.perf_counter()
        now = time.time()
        for request in scheduled.admitted:
            request.metrics.first_scheduled_time = now
        try:
            result = self.runner.execute(scheduled)
        except Exception as exc:  # a failed step fails its requests, never the engine
            logger.exception("engine step failed")
            return self._fail_step(scheduled, exc)
        touched = self._apply_prompt_progress(scheduled, result.prompt_logprobs)
        touched += [r for r in self._apply_samples(result.sampled) if r not in touched]
        outputs = [request_output(r) for r in touched if self._should_emit(r)]
        self._report(scheduled, result, outputs, started)
        return outputs

    def _apply_prompt_progress(self, scheduled: SchedulerOutput, prompt_logprobs) -> list[Request]:
        touched: list[Request] = []
        for chunk in scheduled.prefills:
            request = chunk.request
            request.num_computed += chunk.length
            if request.request_id in prompt_logprobs:
                request.prompt_logprobs.extend(
                    self.logprob_builder.prompt_positions(
                        request.prompt_token_ids, *prompt_logprobs[request.request_id]
                    )
                )
            if not request.prefilling and request.max_tokens == 0:
                for seq in request.sequences:
                    seq.finish_reason = "length"
                self._release_finished(request)
                touched.append(request)
        return touched

    def _apply_samples(self, sampled: SampledTokens) -> list[Request]:
        touched: dict[Request, None] = {}
        now = time.time()
        for i, seq in enumerate(sampled.sequences):
            request = seq.request
            touched[request] = None
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            if seq.finished:  # another choice of this request failed in this step
                continue
            if not sampled.finite[i]:
                request.error = "the model produced non-finite logits for this request"
                for other in request.live_sequences():
                    other.finish_reason = "error"
                continue
            self._append_token(seq, sampled, i)
        for request in touched:
            self._release_finished(request)
        return list(touched)

    def _append_token(self, seq: Sequence, sampled: SampledTokens, row: int) -> None:
        token = sampled.token_ids[row]
        seq.output_token_ids.append(token)
        if seq.logprobs is not None:
            top = seq.request.params.logprobs
            seq.logprobs.append(
                self.logprob_builder.position(
                    token,
                    sampled.logprobs[row],
                    sampled.ranks[row],
                    sampled.top_ids[row][:top] if top else [],
                    sampled.top_logprobs[row][:top] if top else [],
                )
            )
            seq.cumulative_logprob += sampled.logprobs[row]
        stop_string = seq.detokenizer.append(token) if seq.detokenizer else None
        self._check_stop(seq, token, stop_string)

    def _check_stop(self, seq: Sequence, token: int, stop_string: str | None) -> None:
        request = seq.request
        params = request.params
        generated = len(seq.output_token_ids)
        if generated >= params.min_tokens:
            if token in self.eos_token_ids and not params.ignore_eos:
                seq.finish_reason = "stop"
            elif token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif stop_string is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop_string
        if seq.finish_reason is None and (
            generated >= request.max_tokens or request.prompt_len + generated >= self.max_model_len
        ):
            seq.finish_reason = "length"

    def _release_finished(self, request: Request) -> None:
        """Free the slots of choices that have finished (reading their state first), and
        retire the request once every choice has."""
        for seq in request.sequences:
            if seq.finished and seq.slot >= 0:
                if request.params.return_state:
                    seq.state_positions = self.state.retained_positions(seq.slot)
                self.scheduler.release_sequence(seq)
        if request.finished:
            request.metrics.finished_time = time.time()
            self.scheduler.remove(request)
            self._requests.pop(request.request_id, None)

    def _fail_step(self, scheduled: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        outputs = []
        for request in requests_of(scheduled):
            request.error = f"engine step failed: {type(exc).__name__}: {exc}"
            for seq in request.live_sequences():
                seq.finish_reason = "error"
            self._release_finished(request)
            outputs.append(request_output(request))
        return outputs

    # ----- outputs ------------------------------------------------------------------------

    def _should_emit(self, request: Request) -> bool:
        return request.params.output_kind != "final" or request.finished

    def _report(self, scheduled, result, outputs: list[RequestOutput], started: float) -> None:
        if self.stats_callback is None:
            return
        self.stats_callback(
            StepStats(
                phase="prefill" if scheduled.prefills else "decode",
                duration_s=time.perf_counter() - started,
                batch_size=len(scheduled.decodes) + len(scheduled.prefills),
                prompt_tokens=sum(c.length for c in scheduled.prefills),
                generation_tokens=len(result.sampled.sequences),
                evicted_ages=result.evicted_ages,
                finished=[o for o in outputs if o.finished],
            )
        )

    # ----- introspection for servers and metrics ------------------------------------------

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def slots_used(self) -> int:
        return self.scheduler.slots_used
