"""The engine core: the scheduler, the requests' bookkeeping and the step loop's body, token
ids in and out; the executor runs the steps (on one device or over a tensor-parallel group).

It runs in-process under `LLMEngine` (offline) and in its own process under `AsyncEngine`
(`process.py`). Each `step()` returns one `StepOutputs`: the step's sampled tokens and
finished choices as columns, whatever the batch size. The core's host work per step depends
on the batch, never on how many tokens a sequence has generated.

With async scheduling (the default on CUDA) the host schedules and launches step N+1 before
it reads step N back, so its work overlaps the GPU's: a choice that finished in step N may
run one more row in N+1, which is discarded, and its slot is reused only after N+1 (the
device runs the steps in order). While a request whose logits processors read the token
lists, or that returns its state positions, is in the engine, steps run one at a time.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch

from tova_engine.config import EngineConfig
from tova_engine.core.messages import (
    EngineInfo,
    PromptLogprobs,
    RequestFailure,
    SequenceFinish,
    SequenceRef,
    StepOutputs,
    StepStats,
)
from tova_engine.core.prefill_pacer import AUTO_RATIO, PrefillPacer
from tova_engine.core.prefix_cache import PrefixCache
from tova_engine.core.scheduler import Scheduler
from tova_engine.errors import InvalidRequestError
from tova_engine.execution.executor import StepInFlight, make_executor
from tova_engine.execution.runner import SampledTokens
from tova_engine.execution.sampler import make_generator
from tova_engine.state.kv_state import KVState, layer_state_sizes
from tova_engine.state.snapshots import SnapshotSpec, StateSnapshot
from tova_engine.state.store import SavedState, StateStore
from tova_engine.step.batch import SchedulerOutput
from tova_engine.step.request import CoreRequest, Request, Sequence
from tova_engine.structured.compiler import GrammarCompiler

logger = logging.getLogger("tova_engine")


class _Launched(NamedTuple):
    scheduled: SchedulerOutput
    step: StepInFlight
    out: StepOutputs
    started: float


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        # One device or a tensor-parallel group: the core sees one executor either way.
        self.executor = executor = make_executor(config)
        config = executor.config  # resolved: device by index, max_num_seqs sized
        self._on_device = executor.on_device()
        self.prefix_cache = PrefixCache(executor.prefix_cache_rows(), config.prefill_chunk_size)
        target = config.target_itl_ms
        self.pacer = PrefillPacer(
            None if target == "auto" else target / 1e3,
            config.prefill_chunk_size,
            config.batched_token_budget,
        )
        self.scheduler = Scheduler(
            config.max_num_seqs,
            config.batched_token_budget,
            config.prefill_chunk_size,
            self.prefix_cache,
            self.pacer if self.pacer.enabled else None,
        )
        self._requests: dict[str, Request] = {}
        self.grammars = GrammarCompiler(
            executor.tokenizer, executor.model_config.vocab_size, executor.eos_token_ids
        )
        self.store = StateStore(
            config.state_store_memory_bytes, config.state_store_dir, config.state_store_disk_bytes
        )
        self._saved: list[SavedState] = []
        self._store_changed = False
        self._in_flight: _Launched | None = None
        self._exact: set[str] = set()  # requests that need the host current (see `step`)
        self._last_step_end = 0.0
        self.info = self._info()
        self._log_startup()

    # ----- set-up -------------------------------------------------------------------------

    def _info(self) -> EngineInfo:
        executor = self.executor
        config, model_config, policy = executor.config, executor.model_config, executor.policy
        dtype = config.torch_dtype
        fp8 = config.kv_cache_dtype == "fp8"
        cache_bytes = executor.state_row_bytes() * self.prefix_cache.num_rows
        return EngineInfo(
            model_name=executor.model_name,
            max_model_len=executor.max_model_len,
            vocab_size=model_config.vocab_size,
            state_size=config.state_size,
            max_num_seqs=config.max_num_seqs,
            policy=policy.name,
            policy_evicts=policy.evicts,
            policy_protects_recent=policy.protects_recent,
            dtype=str(dtype).removeprefix("torch."),
            device=str(config.torch_device),
            state_bytes_per_sequence=KVState.bytes_per_sequence(
                model_config, config.state_size, dtype, fp8
            ),
            state_total_bytes=executor.state_total_bytes() - cache_bytes,
            eos_token_ids=sorted(executor.eos_token_ids),
            state_bytes_by_layer_kind=KVState.bytes_by_kind(
                model_config, config.state_size, dtype, fp8
            ),
            state_bytes_saved_per_sequence=KVState.bytes_saved_per_sequence(
                model_config, config.state_size, dtype, fp8
            ),
            prefix_cache_rows=self.prefix_cache.num_rows,
            prefix_cache_bytes=cache_bytes,
            quantization=executor.quantization or "none",
            kv_cache_dtype=config.kv_cache_dtype,
        )

    def _log_startup(self) -> None:
        info = self.info
        logger.info(
            "model %s on %s (%s%s); policy %s, state_size %d: state memory %.2f MiB per "
            "request, %.2f MiB for %d slots",
            info.model_name,
            info.device,
            info.dtype,
            (", FP8 weights" if info.quantization == "fp8" else "")
            + (", FP8 state" if info.kv_cache_dtype == "fp8" else ""),
            info.policy,
            info.state_size,
            info.state_bytes_per_sequence / 2**20,
            info.state_total_bytes / 2**20,
            info.max_num_seqs,
        )
        logger.info(
            "prefix cache: %d state rows, %.2f MiB (--prefix-cache-bytes; 0 turns it off)",
            info.prefix_cache_rows,
            info.prefix_cache_bytes / 2**20,
        )
        target = self.executor.config.target_itl_ms
        logger.info(
            "prefill pacing: %s (--target-itl-ms); at most %d tokens a step "
            "(--max-num-batched-tokens), chunks of %d",
            "off" if target == 0
            else f"a step beside decodes lasts about {AUTO_RATIO:g} decode steps"
            if target == "auto" else f"a step beside decodes lasts about {target:g} ms",
            self.pacer.ceiling,
            self.pacer.floor,
        )
        if info.state_bytes_saved_per_sequence:
            model_config = self.executor.model_config
            local = sum(
                model_config.layer_window(layer) is not None
                for layer in range(model_config.num_layers)
            )
            by_kind = info.state_bytes_by_layer_kind
            logger.info(
                "%d of %d layers are sliding-window (window %d): their state holds %d entries, "
                "%.2f MiB per request (global layers %.2f MiB); %.2f MiB per request saved "
                "against every layer holding state_size entries",
                local,
                model_config.num_layers,
                model_config.sliding_window,
                min(layer_state_sizes(model_config, info.state_size)),
                by_kind["local"] / 2**20,
                by_kind["global"] / 2**20,
                info.state_bytes_saved_per_sequence / 2**20,
            )

    # ----- requests -----------------------------------------------------------------------

    def add(
        self,
        core_request: CoreRequest,
        resume: StateSnapshot | None = None,
        grammars: list | None = None,
    ) -> None:
        """resume: the state to continue from, given in process (`LLM`); a request from the
        front end names a stored one instead (`CoreRequest.resume_key`). grammars: the
        structured-output matchers, one per sequence, when the caller built them beside the
        step loop (`core_process`); built here otherwise."""
        if core_request.request_id in self._requests:
            raise InvalidRequestError(
                "request_id", f"request_id {core_request.request_id!r} is already in use"
            )
        params = core_request.params
        device = self.executor.config.torch_device
        generators = [
            None if params.seed is None else make_generator(params.seed, i, device)
            for i in range(params.n)
        ]
        request = Request.of(core_request, generators)
        if params.structured_outputs is not None:
            grammars = grammars or self.grammars.matchers(params)
            for seq, grammar in zip(request.sequences, grammars, strict=True):
                seq.grammar = grammar
        if resume is not None:
            request.continue_from(self._checked(resume, core_request, "resume_from"))
        elif core_request.resume_key is not None:
            request.continue_from(self._stored_state(core_request))
        self._requests[request.request_id] = request
        # The state is read at the end: no step may run ahead of the host (see `step`).
        # Constrained rows: their matchers must have read the last token before the next
        # step's mask is computed.
        if (
            params.logits_processors
            or params.return_state
            or params.keep_state
            or params.structured_outputs
        ):
            self._exact.add(request.request_id)
        self.scheduler.add(request)

    def snapshot_spec(self, capacity: int) -> SnapshotSpec:
        return self.info.snapshot_spec(capacity)

    def _stored_state(self, core_request: CoreRequest) -> StateSnapshot:
        key = core_request.resume_key
        started = time.perf_counter()
        snapshot = self.store.get(key)
        self._store_changed = True
        if snapshot is None:
            raise InvalidRequestError(
                "previous_response_id", f"no stored state {key!r}: it was deleted or expired"
            )
        snapshot = self._checked(snapshot, core_request, "previous_response_id", repr(key))
        self.store.note_restore(time.perf_counter() - started)
        return snapshot

    def _checked(
        self, snapshot: StateSnapshot, core_request: CoreRequest, param: str, name: str = ""
    ) -> StateSnapshot:
        why = snapshot.spec.mismatch(self.snapshot_spec(core_request.capacity))
        if why is not None:
            state = f"the stored state {name}" if name else "the state"
            raise InvalidRequestError(param, f"{state} cannot be continued: {why}")
        return snapshot

    def drop_states(self, keys: list[str]) -> None:
        for key in keys:
            self.store.delete(key)
        self._store_changed = True

    def take_store_updates(self, out: StepOutputs) -> None:
        """Put the states saved and dropped since the last call, and the store's figures
        when they changed, on `out`."""
        out.saved, self._saved = self._saved, []
        out.dropped = self.store.take_dropped()
        if self._store_changed or out.saved or out.dropped:
            out.store = self.store.stats()
            self._store_changed = False

    def abort(
        self, request_ids: list[str], sequences: list[SequenceRef] = (),
        stopped: list[SequenceRef] = (),
    ) -> list[SequenceFinish]:
        """Stop whole requests or single choices now; their slots are free for the next step.
        `stopped`: choices that end as "stop" rather than "abort" (their kept state is
        saved). Returns the choices this finished."""
        finished: list[SequenceFinish] = []
        targets = [(rid, None, "abort") for rid in request_ids]
        targets += [(ref.request_id, ref.index, "abort") for ref in sequences]
        targets += [(ref.request_id, ref.index, "stop") for ref in stopped]
        for request_id, index, reason in targets:
            request = self._requests.get(request_id)
            if request is None:
                continue
            for seq in request.live_sequences():
                if index is None or seq.index == index:
                    seq.finish_reason = reason
            self._release_finished(request, finished)
        return finished

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do on one device)."""
        self.executor.close()

    def retained_by_rank(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each tensor-parallel rank's (positions, num_entries) of its state, rank order (one
        entry on one device): the ranks must hold the same, or one evicted differently.
        Between steps only."""
        if self._in_flight is not None:
            raise RuntimeError("retained_by_rank: a step is in flight")
        return self.executor.retained_by_rank()

    def has_unfinished_requests(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_unfinished()

    # ----- stepping -----------------------------------------------------------------------

    def step(self) -> StepOutputs | None:
        """Run one scheduled step and return its outputs. With async scheduling, launch the
        next step and return the outputs of the one launched before it. None when no step
        finished."""
        # Triton launches and graph replays go to the thread's current device, not the
        # tensors': another engine in this process (or thread) may have made another current.
        with self._on_device:
            return self._step()

    def _step(self) -> StepOutputs | None:
        # Requests whose logits processors read the token lists, or that return their state
        # positions, need the host to be current: then the engine runs one step at a time.
        overlap = self.executor.config.async_scheduling and not self._exact
        previous, self._in_flight = self._in_flight, None
        if previous is not None and not overlap:
            return self._finish(previous)  # drain; the next call runs a step of its own
        scheduled = self.scheduler.schedule()
        if scheduled.empty:
            return None if previous is None else self._finish(previous)
        launched = self._launch(scheduled)
        if not overlap:
            return self._finish(launched)
        self._in_flight = launched
        return None if previous is None else self._finish(previous)

    def _launch(self, scheduled: SchedulerOutput) -> _Launched:
        started = time.perf_counter()
        out = StepOutputs.empty(time.time())
        out.admitted = [request.request_id for request in scheduled.admitted]
        out.cached_tokens = {
            c.request.request_id: c.request.cached_tokens
            for c in scheduled.prefills
            if c.restore_from is not None
        }
        step = self.executor.launch(scheduled)
        if step.error is not None:  # before the next step can look its saves up
            self._forget_saves(scheduled)
        return _Launched(scheduled, step, out, started)

    def _finish(self, launched: _Launched) -> StepOutputs:
        scheduled, step, out, started = launched
        try:
            result = self.executor.collect(step)
        except Exception as exc:  # a failed step fails its requests, never the engine
            logger.error("engine step failed", exc_info=exc)
            self._fail_step(scheduled, exc, out)
            out.stats = self.stats(scheduled, self._step_time(started), 0, [])
            self.take_store_updates(out)
            return out
        self._apply_prompt_progress(scheduled, result.prompt_logprobs, out)
        self._apply_samples(result.sampled, out)
        out.stats = self.stats(
            scheduled, self._step_time(started), len(result.sampled.sequences),
            result.evicted_ages,
        )
        self.pacer.observe(len(scheduled.decodes), out.stats.prompt_tokens, out.stats.duration_s)
        self.take_store_updates(out)
        return out

    def _apply_prompt_progress(self, scheduled: SchedulerOutput, prompt_logprobs, out) -> None:
        for chunk in scheduled.prefills:  # (the scheduler advanced `num_computed` already)
            request = chunk.request
            if request.request_id in prompt_logprobs:
                first, values = prompt_logprobs[request.request_id]
                out.prompt_logprobs.append(PromptLogprobs(request.request_id, first, *values))
            if chunk.completes_prompt and request.max_tokens == 0 and not request.finished:
                for seq in request.sequences:
                    seq.finish_reason = "length"
                self._release_finished(request, out.finished)

    def _apply_samples(self, sampled: SampledTokens, out: StepOutputs) -> None:
        touched: dict[Request, None] = {}
        rows = sampled.sequences
        with_logprobs = any(seq.request.params.logprobs is not None for seq in rows)
        if with_logprobs:
            out.logprobs, out.ranks = [], []
            if sampled.top_ids is not None:
                out.top_ids, out.top_logprobs = [], []
        for i, seq in enumerate(rows):
            request = seq.request
            touched[request] = None
            if seq.finished:  # another choice of this request failed in this step
                continue
            if not sampled.finite[i]:
                self._fail(request, "the model produced non-finite logits for this request", out)
                continue
            token = sampled.token_ids[i]
            seq.output_token_ids.append(token)
            out.request_ids.append(request.request_id)
            out.indexes.append(seq.index)
            out.token_ids.append(token)
            if with_logprobs:
                out.logprobs.append(sampled.logprobs[i])
                out.ranks.append(sampled.ranks[i])
                if out.top_ids is not None:
                    out.top_ids.append(sampled.top_ids[i])
                    out.top_logprobs.append(sampled.top_logprobs[i])
            self._check_stop(seq, token)
        for request in touched:
            self._release_finished(request, out.finished)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        """Token-level stops; stop strings are the front end's, which aborts the choice."""
        request = seq.request
        params = request.params
        generated = len(seq.output_token_ids)
        if seq.grammar is not None and _grammar_done(seq.grammar, token):
            seq.finish_reason = "stop"
            return
        if generated >= params.min_tokens:
            if token in self.executor.eos_token_ids and not params.ignore_eos:
                seq.finish_reason = "stop"
            elif token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
        if seq.finish_reason is None and (
            generated >= request.max_tokens
            or request.position_offset + request.prompt_len + generated
            >= self.executor.max_model_len
        ):
            seq.finish_reason = "length"

    def _release_finished(self, request: Request, finished: list[SequenceFinish]) -> None:
        """Report choices that have finished and free their slots (reading their state
        first); retire the request once every choice has."""
        for seq in request.sequences:
            if not seq.finished or seq.reported:
                continue
            positions = None
            if seq.slot >= 0 and request.params.return_state:
                positions = self.executor.retained_positions(seq.slot)
            # A failed or abandoned (aborted) request leaves no state behind.
            if seq.slot >= 0 and request.params.keep_state and seq.finish_reason in (
                "stop",
                "length",
            ):
                self._save_state(request, seq)
            self.scheduler.release_sequence(seq)
            seq.reported = True
            finished.append(
                SequenceFinish(
                    request.request_id, seq.index, seq.finish_reason, seq.stop_reason, positions
                )
            )
        if request.finished:
            self.scheduler.remove(request)
            self._requests.pop(request.request_id, None)
            self._exact.discard(request.request_id)

    def _save_state(self, request: Request, seq: Sequence) -> None:
        """Keep the slot's state under the request's id. The last sampled token was never
        fed to the state: a continuation feeds it first."""
        pending = seq.output_token_ids[-1:]
        spec = self.snapshot_spec(request.capacity)
        snapshot = self.executor.snapshot(seq.slot, spec, pending)
        if self.store.put(request.request_id, snapshot):
            self._saved.append(
                SavedState(request.request_id, snapshot.num_tokens, snapshot.nbytes)
            )
        self._store_changed = True

    def _fail(self, request: Request, message: str, out: StepOutputs) -> None:
        request.error = message
        out.failed.append(RequestFailure(request.request_id, message))
        for seq in request.live_sequences():
            seq.finish_reason = "error"

    def _fail_step(self, scheduled: SchedulerOutput, exc: Exception, out: StepOutputs) -> None:
        self._forget_saves(scheduled)
        for request in scheduled.requests:
            self._fail(request, f"engine step failed: {type(exc).__name__}: {exc}", out)
            self._release_finished(request, out.finished)

    def _forget_saves(self, scheduled: SchedulerOutput) -> None:
        """A failed step's prefix saves may not have happened: those rows hold no key's state."""
        self.prefix_cache.forget([c.save_to for c in scheduled.prefills if c.save_to is not None])

    # ----- counts for metrics -------------------------------------------------------------

    def _step_time(self, started: float) -> float:
        """From the step's launch, or from the previous step's end if that came later (steps
        overlap under async scheduling): the time the step adds."""
        now = time.perf_counter()
        duration = now - max(started, self._last_step_end)
        self._last_step_end = now
        return duration

    def stats(
        self,
        scheduled: SchedulerOutput | None = None,
        duration: float = 0.0,
        generated: int = 0,
        evicted_ages: list[int] | None = None,
    ) -> StepStats:
        """The step's figures (none when `scheduled` is None) and the counts after it."""
        prefills = scheduled.prefills if scheduled is not None else []
        decodes = scheduled.decodes if scheduled is not None else []
        # A prompt's first chunk is where it looked the prefix cache up.
        looked_up = [
            c for c in prefills
            if self.prefix_cache.enabled and c.start == c.request.cached_tokens
            and PrefixCache.looks_up(c.request)
        ]
        return StepStats(
            phase="prefill" if prefills else "decode",
            duration_s=duration,
            batch_size=len(decodes) + len(prefills),
            prompt_tokens=sum(c.length for c in prefills),
            generation_tokens=generated,
            evicted_ages=evicted_ages or [],
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            slots_used=self.scheduler.slots_used,
            prefix_cache_queried_tokens=sum(c.request.prompt_len for c in looked_up),
            prefix_cache_hit_tokens=sum(c.request.cached_tokens for c in looked_up),
            prefix_cache_rows_used=self.prefix_cache.rows_used,
            prompt_token_budget=self.pacer.budget,
        )


def _grammar_done(matcher, token: int) -> bool:
    """Advance a structured output's matcher by the sampled token; True once the output is
    complete (the grammar accepts nothing more, the end-of-sequence token included)."""
    matcher.consume_token(token)
    return matcher.is_stopped()
