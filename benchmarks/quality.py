"""Quality against state size: perplexity, the chunked-prefill trade-off and passkey retrieval
for every eviction policy, measured through the engine itself (prompt_logprobs, generate).

    python -m benchmarks.quality --device cuda cuda cuda cuda cuda      # GPU: 8192-token windows
    python -m benchmarks.quality --window 1024 --state-sizes 64 128 256 512 \\
        --chunk-state-sizes 64 128 --passkey-lengths 1024 --passkey-trials 2     # CPU

docs/quality.md says what is measured and holds the results.

Every request of one policy and prefill chunk size runs as one batch in one engine: a job.
Jobs are independent, so `--device cuda:0 cuda:1` spreads them over GPUs (a process each) and
`--resume OLD/jobs.jsonl` reuses the jobs an earlier (cut short, or partial) run finished.
Writes quality.json, quality.md, jobs.jsonl and PNG plots into --out-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import multiprocessing
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks.quality_data import Passkey, load_ids, passkey_found, passkey_prompts, ppl_windows
from tova_engine import LLM, RequestOutput, SamplingParams
from tova_engine.loader import load_source
from tova_engine.state.policies import POLICIES as BUILT_IN
from tova_engine.state.policies import Policy, make_policy

PARTS = ("ppl", "chunks", "passkey")
POLICIES = ("full", "tova", "h2o", "sink", "window")
DEFAULT_TEXT = Path(__file__).parent / "data" / "pride_and_prejudice.txt"
DEFAULT_OUT = Path(__file__).parent / "results" / "quality"


@dataclass(frozen=True, slots=True)
class Variant:
    """A policy as measured: a built-in one, optionally with its first `first` positions or
    its latest `recent` ones (a fraction of S, or a count) protected. Written as the built-in
    name with options: `tova`, `tova:recent=0.25`, `tova:first=1`, `tova:recent=0.125,first=1`.
    `recent` is a request setting, so variants differing only in it share one engine."""

    spec: str
    base: str
    recent: int | float | None = None
    first: int = 0

    @classmethod
    def parse(cls, spec: str) -> Variant:
        base, _, options = spec.partition(":")
        if base not in BUILT_IN:
            raise ValueError(f"policy {spec!r}: one of {', '.join(BUILT_IN)}, with options")
        values: dict[str, Any] = {}
        for option in filter(None, options.split(",")):
            key, _, value = option.partition("=")
            if key == "recent":
                values["recent"] = float(value) if "." in value else int(value)
            elif key == "first":
                values["first"] = int(value)
            else:
                raise ValueError(f"policy {spec!r}: options are recent=R and first=K")
        variant = cls(spec, base, **values)
        make_policy(variant.engine_policy(), variant.recent)  # the engine's own checks
        return variant

    @property
    def engine_key(self) -> str:
        """What needs an engine of its own: the built-in policy and its protected first."""
        return self.base if not self.first else f"{self.base}:first={self.first}"

    def engine_policy(self) -> str | Policy:
        if not self.first:
            return self.base
        return dataclasses.replace(
            BUILT_IN[self.base], name=self.engine_key, protect_first=self.first
        )


@dataclass(frozen=True, slots=True)
class ModelArgs:
    """How every job loads the model; part of each job's identity for --resume."""

    model: str | None
    load_format: str
    dtype: str
    seed: int
    quantization: str | None = None  # "fp8": FP8 weights
    kv_cache_dtype: str = "auto"  # "fp8": the state in float8


@dataclass(frozen=True, slots=True)
class Task:
    """One request: a prompt scored (ppl, chunks) or answered (passkey) under one policy,
    state size and prefill chunk size."""

    part: str
    policy: str
    state_size: int
    chunk: int
    prompt: list[int]
    max_tokens: int
    # {"window": i}, or the passkey cell: length, depth, trial, key, prompt_tokens.
    label: dict[str, Any]

    def params(self) -> SamplingParams:
        recent = Variant.parse(self.policy).recent
        if self.part == "passkey":
            return SamplingParams(
                temperature=0,
                max_tokens=self.max_tokens,
                state_size=self.state_size,
                protect_recent=recent,
            )
        return SamplingParams(
            max_tokens=0,
            prompt_logprobs=0,
            state_size=self.state_size,
            return_state=True,
            protect_recent=recent,
        )


@dataclass(slots=True)
class Job:
    """The tasks of one engine: one policy (a variant's `engine_key`: variants that differ
    in their recency protection alone share it), one prefill chunk size. Timed jobs (the chunk
    trade-off) hold nothing else, so their wall time is their own prefill time."""

    policy: str
    chunk: int
    timed: bool
    tasks: list[Task]

    @property
    def name(self) -> str:
        return f"{'chunks' if self.timed else 'main'}-{self.policy}-c{self.chunk}"

    @property
    def state_size(self) -> int:
        return max(t.state_size for t in self.tasks)

    @property
    def token_budget(self) -> int:
        if self.policy == "full":
            # Nothing is evicted, so where chunks end changes nothing: a prompt per step will
            # do (a budget for all would reserve activations for them all at once).
            return max(2048, self.chunk + 1)
        # Every prefilling sequence gets a whole chunk each step (plus a decode token), so
        # chunk boundaries fall at multiples of `chunk` whatever else runs in the batch.
        return max(2048, len(self.tasks) * (self.chunk + 1))

    @property
    def cost(self) -> int:
        """Model forwards, roughly: one-token chunks of all sequences share each step, longer
        chunks run one forward each."""
        decode = max(t.max_tokens for t in self.tasks)
        if self.chunk == 1:
            return max(len(t.prompt) for t in self.tasks) + decode
        return sum(math.ceil(len(t.prompt) / self.chunk) for t in self.tasks) + decode

    def signature(self, model: ModelArgs) -> str:
        """Changes whenever anything that decides the job's results does."""
        digest = hashlib.sha256()
        fields = asdict(model)
        # As before these fields existed: earlier runs' jobs still match.
        if fields["quantization"] is None:
            del fields["quantization"]
        if fields["kv_cache_dtype"] == "auto":
            del fields["kv_cache_dtype"]
        head = [fields, self.policy, self.chunk, self.timed]
        digest.update(json.dumps(head).encode())
        for t in self.tasks:
            digest.update(json.dumps([t.part, t.state_size, t.max_tokens, t.label]).encode())
            digest.update(",".join(map(str, t.prompt)).encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Plan:
    """What to measure, once the token ids exist."""

    parts: tuple[str, ...]
    policies: tuple[str, ...]
    state_sizes: tuple[int, ...]
    chunk_sizes: tuple[int, ...]
    chunk_state_sizes: tuple[int, ...]
    answer_tokens: int


# ----- tasks and jobs ------------------------------------------------------------------------


def build_tasks(plan: Plan, windows: list[list[int]], passkeys: list[Passkey]) -> list[Task]:
    # `full` never evicts, so its prefill chunk changes nothing: one chunk per prompt.
    full_chunk = max([len(w) for w in windows] + [len(p.ids) for p in passkeys] + [1])
    tasks: list[Task] = []
    if "ppl" in plan.parts:
        tasks += _ppl_tasks(plan, windows, full_chunk)
    if "passkey" in plan.parts:
        tasks += _passkey_tasks(plan, passkeys, full_chunk)
    if "chunks" in plan.parts:
        tasks += [
            Task("chunks", "tova", size, chunk, w, 0, {"window": i})
            for chunk in plan.chunk_sizes
            for size in plan.chunk_state_sizes
            for i, w in enumerate(windows)
        ]
    return tasks


def _ppl_tasks(plan: Plan, windows: list[list[int]], full_chunk: int) -> list[Task]:
    tasks = []
    for policy in plan.policies:
        for i, w in enumerate(windows):
            if policy == "full":
                tasks.append(Task("ppl", policy, len(w), full_chunk, w, 0, {"window": i}))
                continue
            # One-token chunks: the state evicts after every token, as the paper measures.
            tasks += [Task("ppl", policy, s, 1, w, 0, {"window": i}) for s in plan.state_sizes]
    return tasks


def _passkey_tasks(plan: Plan, passkeys: list[Passkey], full_chunk: int) -> list[Task]:
    tasks = []
    for p in passkeys:
        label = {
            "length": p.length,
            "depth": p.depth,
            "trial": p.trial,
            "key": p.key,
            "prompt_tokens": len(p.ids),
        }
        for policy in plan.policies:
            if policy == "full":
                size = len(p.ids) + plan.answer_tokens
                tasks.append(
                    Task("passkey", policy, size, full_chunk, p.ids, plan.answer_tokens, label)
                )
                continue
            tasks += [
                Task("passkey", policy, s, 1, p.ids, plan.answer_tokens, label)
                for s in plan.state_sizes
            ]
    return tasks


def group_jobs(tasks: list[Task]) -> list[Job]:
    """One job per (timed?, engine policy, chunk): perplexity and passkey requests of a policy share
    one engine and its one-token steps; the chunk trade-off runs apart, for clean timings."""
    jobs: dict[tuple[bool, str, int], Job] = {}
    for task in tasks:
        timed = task.part == "chunks"
        policy = Variant.parse(task.policy).engine_key
        key = (timed, policy, task.chunk)
        jobs.setdefault(key, Job(policy, task.chunk, timed, [])).tasks.append(task)
    return list(jobs.values())


# ----- running jobs ------------------------------------------------------------------------


def run_job(job: Job, model: ModelArgs, device: str) -> dict[str, Any]:
    """Run one job's requests as one batch; returns its timings and per-task results."""
    started = time.perf_counter()
    llm = LLM(
        model.model,
        state_size=job.state_size,
        policy=Variant.parse(job.policy).engine_policy(),
        dtype=model.dtype,
        device=device,
        max_num_seqs=len(job.tasks),
        prefill_chunk_size=job.chunk,
        load_format=model.load_format,
        seed=model.seed,
        max_num_batched_tokens=job.token_budget,
        quantization=model.quantization,
        kv_cache_dtype=model.kv_cache_dtype,
        kernels="torch" if model.kv_cache_dtype == "fp8" else "auto",
    )
    load_s = time.perf_counter() - started
    _warm_up(llm, job)
    started = time.perf_counter()
    outputs = _generate_longest_first(llm, job.tasks)
    run_s = time.perf_counter() - started
    errors = [o.error for o in outputs if o.error]
    if errors:
        raise RuntimeError(f"job {job.name}: {len(errors)} requests failed, e.g. {errors[0]}")
    result = {
        "name": job.name,
        "policy": job.policy,
        "chunk": job.chunk,
        "timed": job.timed,
        "state_size": job.state_size,
        "sequences": len(job.tasks),
        "device": llm.engine.info.device,
        "dtype": llm.engine.info.dtype,
        "model": llm.engine.model_name,
        "torch": torch.__version__,
        "load_s": load_s,
        "run_s": run_s,
        "tasks": [task_result(t, o) for t, o in zip(job.tasks, outputs, strict=True)],
    }
    del llm, outputs
    _free_memory()
    return result


def _generate_longest_first(llm: LLM, tasks: list[Task]) -> list[RequestOutput]:
    """Outputs in task order. Slots go out in admission order, so submitting the longest-lived
    requests first keeps the ones still running in one block of slots as shorter ones finish:
    the decode step then reads their state as a view instead of gathering a copy."""
    order = sorted(range(len(tasks)), key=lambda i: -(len(tasks[i].prompt) + tasks[i].max_tokens))
    outputs = llm.generate(
        [tasks[i].prompt for i in order], [tasks[i].params() for i in order], use_tqdm=False
    )
    by_task = dict(zip(order, outputs, strict=True))
    return [by_task[i] for i in range(len(tasks))]


def _warm_up(llm: LLM, job: Job) -> None:
    """A short request first, so one-off costs (CUDA context, first kernel launches, allocator
    growth) stay out of the timed run."""
    task = job.tasks[0]
    prompt = task.prompt[: min(16, len(task.prompt))]
    size = min(task.state_size, job.state_size)
    llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0, state_size=size), False)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def task_result(task: Task, output: RequestOutput) -> dict[str, Any]:
    if task.part == "passkey":
        answer = output.outputs[0].text
        return {"answer": answer, "correct": passkey_found(task.label["key"], answer)}
    # Entry i (i >= 1) holds log p(prompt[i] | prompt[:i]) under the policy; entry 0 is None.
    logprobs = [
        pos[token].logprob
        for token, pos in zip(task.prompt[1:], output.prompt_logprobs[1:], strict=True)
    ]
    return {
        "nll": -math.fsum(logprobs),
        "tokens": len(logprobs),
        "state": state_summary(task.prompt, output.outputs[0].state_positions or []),
    }


def state_summary(prompt: list[int], layers: list[list[int]]) -> dict[str, Any]:
    """What the state holds once the window is read, over all layers: how many layers keep the
    first token (an attention sink), the share of entries a plain window would hold as well,
    the median age of an entry, and the tokens kept most often against their share of the
    text."""
    if not layers or not layers[0]:
        return {}
    end = len(prompt)
    kept = [p for layer in layers for p in layer]
    recent = sum(sum(1 for p in layer if p >= end - len(layer)) for layer in layers)
    kept_ids = Counter(prompt[p] for p in kept)
    text_ids = Counter(prompt)
    return {
        "first_token": sum(1 for layer in layers if layer[0] == 0) / len(layers),
        "recent_share": recent / len(kept),
        "median_age": statistics.median(end - 1 - p for p in kept),
        "top_kept": [
            [token, count / len(kept), text_ids[token] / end]
            for token, count in kept_ids.most_common(8)
        ],
    }


def run_jobs(
    signed: list[tuple[str, Job]],
    model: ModelArgs,
    devices: list[str],
    reuse: dict[str, dict[str, Any]],
    log_path: Path,
) -> dict[str, dict[str, Any]]:
    """Run the jobs `reuse` lacks; each finished job is appended to log_path at once, so a
    run cut short keeps what it did (pass that file to --resume)."""
    results: dict[str, dict[str, Any]] = {}
    todo = [(sig, job) for sig, job in signed if sig not in reuse]
    with log_path.open("w") as log:

        def record(sig: str, result: dict[str, Any]) -> None:
            results[sig] = result
            log.write(json.dumps({"signature": sig, **result}) + "\n")
            log.flush()

        for sig, _job in signed:
            if sig in reuse:
                _progress(f"{reuse[sig]['name']}: reused from --resume")
                record(sig, reuse[sig])
        for sig, result in _execute(todo, model, devices):
            record(sig, result)
    return results


def _execute(
    todo: list[tuple[str, Job]], model: ModelArgs, devices: list[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    if len(devices) == 1:
        for sig, job in todo:
            yield sig, _run_reported(job, model, devices[0])
        return
    # Longest first over one process per device; spawn, as CUDA cannot be used after fork.
    todo = sorted(todo, key=lambda item: -item[1].cost)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    for device in devices:
        queue.put(device)
    with ProcessPoolExecutor(
        len(devices), mp_context=context, initializer=_bind_device, initargs=(queue,)
    ) as pool:
        futures = {pool.submit(_run_in_worker, job, model): sig for sig, job in todo}
        for future in as_completed(futures):
            yield futures[future], future.result()


_WORKER_DEVICE = "cpu"  # set once per worker process by _bind_device


def _bind_device(queue) -> None:
    global _WORKER_DEVICE
    _WORKER_DEVICE = queue.get()
    if _WORKER_DEVICE.startswith("cuda:"):
        torch.cuda.set_device(_WORKER_DEVICE)


def _run_in_worker(job: Job, model: ModelArgs) -> dict[str, Any]:
    return _run_reported(job, model, _WORKER_DEVICE)


def _run_reported(job: Job, model: ModelArgs, device: str) -> dict[str, Any]:
    _progress(
        f"{job.name}: {len(job.tasks)} sequences, state {job.state_size}, "
        f"~{job.cost} forwards on {device}"
    )
    result = run_job(job, model, device)
    _progress(f"{job.name}: done in {result['run_s']:.1f} s (+{result['load_s']:.1f} s load)")
    return result


def _progress(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_reusable(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None or not path.exists():
        return {}
    lines = path.read_text().splitlines()
    return {r.pop("signature"): r for r in map(json.loads, filter(None, lines))}


# ----- summaries -----------------------------------------------------------------------------


class Item(NamedTuple):
    """One task with its result and its job's (a task's wall time is its job's)."""

    task: Task
    out: dict[str, Any]
    job_result: dict[str, Any]
    job: Job


def summarize(
    signed: list[tuple[str, Job]], results: dict[str, dict[str, Any]], window: int
) -> dict[str, Any]:
    by_part: dict[str, list[Item]] = defaultdict(list)
    for sig, job in signed:
        result = results[sig]
        for task, out in zip(job.tasks, result["tasks"], strict=True):
            by_part[task.part].append(Item(task, out, result, job))
    perplexity = perplexity_rows(by_part["ppl"])
    chunks = chunk_rows(by_part["chunks"])
    return {
        "perplexity": perplexity,
        "chunks": chunks + per_token_chunk_rows(chunks, by_part["ppl"]),
        "passkey": passkey_summary(by_part["passkey"]),
        "checks": paper_checks(perplexity, window),
        "jobs": [{k: v for k, v in results[sig].items() if k != "tasks"} for sig, _job in signed],
    }


def _ppl_row(items: list[Item]) -> dict[str, Any]:
    outs = [item.out for item in items]
    nll, tokens = math.fsum(o["nll"] for o in outs), sum(o["tokens"] for o in outs)
    states = [o["state"] for o in outs if o["state"]]
    row = {
        "ppl": math.exp(nll / tokens),
        "nll": nll,
        "tokens": tokens,
        "window_ppl": [math.exp(o["nll"] / o["tokens"]) for o in outs],
    }
    if states:
        row["state"] = {
            key: statistics.fmean(s[key] for s in states)
            for key in ("first_token", "recent_share", "median_age")
        }
        row["state"]["top_kept_first_window"] = states[0]["top_kept"]
    return row


def _grouped(items: list[Item], *fields: str) -> dict[tuple, list[Item]]:
    groups: dict[tuple, list[Item]] = defaultdict(list)
    for item in items:
        groups[tuple(getattr(item.task, f) for f in fields)].append(item)
    return groups


def perplexity_rows(items: list[Item]) -> list[dict[str, Any]]:
    return [
        {"policy": policy, "state_size": size, **_ppl_row(group)}
        for (policy, size), group in _grouped(items, "policy", "state_size").items()
    ]


def chunk_rows(items: list[Item]) -> list[dict[str, Any]]:
    rows = []
    for (chunk, size), group in sorted(_grouped(items, "chunk", "state_size").items()):
        result, job = group[0].job_result, group[0].job
        rows.append(
            {
                "chunk": chunk,
                "state_size": size,
                **_ppl_row(group),
                # The whole job's prefill: every state size and window of this chunk size.
                "prefill_s": result["run_s"],
                "sequences": len(job.tasks),
                "prompt_tokens_per_s": sum(len(t.prompt) for t in job.tasks) / result["run_s"],
                "shared_batch": False,
            }
        )
    return rows


def per_token_chunk_rows(chunks: list[dict[str, Any]], ppl: list[Item]) -> list[dict[str, Any]]:
    """Chunk 1 is exactly the perplexity part's TOVA run: when the chunk part skipped it (it
    costs a whole per-token pass), take it from there. Its time is then that of a larger
    batch (other state sizes, passkey prompts): `shared_batch` marks it."""
    if not chunks or any(r["chunk"] == 1 for r in chunks):
        return []
    sizes = {r["state_size"] for r in chunks}
    mine = [i for i in ppl if i.task.policy == "tova" and i.task.state_size in sizes]
    return [{**row, "shared_batch": True} for row in chunk_rows(mine)]


def passkey_summary(items: list[Item]) -> dict[str, Any]:
    trials = [
        {
            "policy": task.policy,
            # `full` holds the whole prompt: its state size is not a setting.
            "state_size": None if task.policy == "full" else task.state_size,
            **task.label,
            **out,
        }
        for task, out, *_ in items
    ]
    # A small model misses some keys even with the whole prompt in context; what a bounded
    # state costs shows in the keys the full model finds, so those are summarized apart.
    found = {_trial_key(t) for t in trials if t["policy"] == "full" and t["correct"]}
    return {
        "trials": trials,
        "accuracy": _accuracy(trials, ("policy", "state_size")),
        "cells": _accuracy(trials, ("policy", "state_size", "length", "depth")),
        "retained": _accuracy(
            [t for t in trials if t["policy"] != "full" and _trial_key(t) in found],
            ("policy", "state_size"),
        ),
    }


def _trial_key(trial: dict[str, Any]) -> tuple[int, float, int]:
    return trial["length"], trial["depth"], trial["trial"]


def _accuracy(trials: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    groups = defaultdict(list)
    for t in trials:
        groups[tuple(t[k] for k in keys)].append(t["correct"])
    return [
        {**dict(zip(keys, key, strict=True)), "accuracy": sum(hits) / len(hits), "n": len(hits)}
        for key, hits in groups.items()
    ]


def paper_checks(perplexity: list[dict[str, Any]], window: int) -> dict[str, Any]:
    """The paper's claims, on our numbers: TOVA best and a plain window worst at every state
    size; TOVA at 1/8 of the context within 3.5% of the full model."""
    table = {(r["policy"], r["state_size"]): r["ppl"] for r in perplexity}
    ordering = {}
    for size in sorted({s for p, s in table if p != "full"}):
        # The paper's policies as the paper ran them (variants are compared apart).
        values = {p: table[(p, size)] for p in POLICIES if p != "full" and (p, size) in table}
        if "tova" in values and "window" in values:
            ordering[size] = {
                "tova_best": values["tova"] == min(values.values()),
                "window_worst": values["window"] == max(values.values()),
            }
    full = table.get(("full", window))
    eighth = table.get(("tova", window // 8))
    gap = None if full is None or eighth is None else eighth / full - 1
    return {
        "ordering": ordering,
        "ordering_holds": bool(ordering) and all(all(v.values()) for v in ordering.values()),
        "eighth_state_size": window // 8,
        "tova_eighth_gap": gap,
        "tova_eighth_within_3_5_percent": gap is not None and gap <= 0.035,
    }


# ----- command line ------------------------------------------------------------------------


def _variant_spec(text: str) -> str:
    try:
        return Variant.parse(text).spec
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _chunk_size(text: str) -> int | str:
    return "window" if text == "window" else int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="as LLM(model=...); default: SmolLM2-135M")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="the weights' (default: the checkpoint's)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="the state's K/V storage (fp8 runs the PyTorch kernels)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="float32 by default: eviction decisions should not hinge on bf16 rounding",
    )
    p.add_argument(
        "--device",
        nargs="+",
        default=["auto"],
        help="one or more devices; several run jobs in parallel, a process each",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: ppl,chunks,passkey")
    p.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        type=_variant_spec,
        help="built-in policies, optionally with protections: tova:recent=0.25 (the latest "
        "quarter of S), tova:first=1 (the first token), tova:recent=64 (a count)",
    )
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument(
        "--token-ids",
        type=Path,
        default=None,
        help="a JSON list of token ids to use instead of --text",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="tokens per perplexity window; default: the model's position limit",
    )
    p.add_argument("--windows", type=int, default=1, help="windows to average over")
    p.add_argument(
        "--state-sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096]
    )
    p.add_argument(
        "--chunk-sizes",
        type=_chunk_size,
        nargs="+",
        default=[1, 16, 64, 256, "window"],
        help="prefill chunks; 'window' = whole",
    )
    p.add_argument("--chunk-state-sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument(
        "--passkey-lengths",
        type=int,
        nargs="+",
        default=[2048, 4096, 8192],
        help="prompt + answer tokens",
    )
    p.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--passkey-trials", type=int, default=1, help="random keys per length/depth")
    p.add_argument("--passkey-max-tokens", type=int, default=8)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="a jobs.jsonl of an earlier run: its finished jobs are not run again",
    )
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    args.parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    unknown = set(args.parts) - set(PARTS)
    if unknown or not args.parts:
        p.error(f"--parts takes a comma-separated subset of {','.join(PARTS)}")
    return args


def _validate(args: argparse.Namespace, window: int, positions: int) -> None:
    checks = {
        "--window": [window],
        "--state-sizes": args.state_sizes,
        "--chunk-state-sizes": args.chunk_state_sizes,
        "--passkey-lengths": args.passkey_lengths if "passkey" in args.parts else [],
    }
    for flag, values in checks.items():
        for value in values:
            if not 1 <= value <= positions:
                raise ValueError(f"{flag} {value}: must be in [1, {positions}] (model positions)")
    if any(c != "window" and c < 1 for c in args.chunk_sizes):
        raise ValueError("--chunk-sizes must be >= 1 (or 'window')")
    if args.windows < 1 or args.passkey_trials < 1 or args.passkey_max_tokens < 1:
        raise ValueError("--windows, --passkey-trials and --passkey-max-tokens must be >= 1")
    if not all(0 <= d <= 1 for d in args.passkey_depths):
        raise ValueError("--passkey-depths must lie in [0, 1]")


def _passkeys(args: argparse.Namespace, tokenizer) -> list[Passkey]:
    if "passkey" not in args.parts:
        return []
    return passkey_prompts(
        tokenizer,
        args.passkey_lengths,
        args.passkey_depths,
        args.passkey_trials,
        args.passkey_max_tokens,
        args.seed,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.perf_counter()
    source = load_source(args.model, args.load_format)  # config and tokenizer; no weights
    positions = source.config.max_position_embeddings
    window = args.window or positions
    tokenizer = source.tokenizer
    if "passkey" in args.parts and not getattr(tokenizer, "chat_template", None):
        _progress("passkey skipped: the model has no tokenizer with a chat template")
        args.parts = tuple(p for p in args.parts if p != "passkey")
    _validate(args, window, positions)
    ids = load_ids(args.text, args.token_ids, tokenizer)
    windows = ppl_windows(ids, window, args.windows)
    passkeys = _passkeys(args, tokenizer)
    parts = args.parts
    chunk_sizes = tuple(window if c == "window" else c for c in args.chunk_sizes)
    plan = Plan(
        parts,
        tuple(args.policies),
        tuple(args.state_sizes),
        chunk_sizes,
        tuple(args.chunk_state_sizes),
        args.passkey_max_tokens,
    )
    model = ModelArgs(args.model, args.load_format, args.dtype, args.seed, args.quantization,
                      args.kv_cache_dtype)
    signed = [
        (job.signature(model), job) for job in group_jobs(build_tasks(plan, windows, passkeys))
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    reuse = load_reusable(args.resume)
    results = run_jobs(signed, model, args.device, reuse, args.out_dir / "jobs.jsonl")
    report = summarize(signed, results, window)
    _name_kept_tokens(report, tokenizer)
    seconds = time.perf_counter() - started
    report["settings"] = _settings(args, argv, source.name, window, len(ids), parts, seconds)
    # Reused jobs keep their own timings: this is the compute behind the numbers.
    report["settings"]["jobs_s"] = sum(r["load_s"] + r["run_s"] for r in results.values())
    write_outputs(report, args.out_dir, plots=not args.no_plots)
    return report


def _name_kept_tokens(report: dict[str, Any], tokenizer) -> None:
    """Add each most-kept token's text, for reading the state tables."""
    if tokenizer is None:
        return
    for row in report["perplexity"]:
        for entry in row.get("state", {}).get("top_kept_first_window", []):
            entry.append(tokenizer.decode([entry[0]]))


def _settings(
    args: argparse.Namespace,
    argv: list[str],
    model_name: str,
    window: int,
    text_tokens: int,
    parts: tuple[str, ...],
    seconds: float,
) -> dict[str, Any]:
    return {
        "command": " ".join(["python -m benchmarks.quality", *argv]),
        "model": model_name,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "devices": args.device,
        "torch": torch.__version__,
        "text": str(args.token_ids or args.text),
        "text_tokens": text_tokens,
        "window": window,
        "windows": args.windows,
        "parts": list(parts),
        "policies": args.policies,
        "state_sizes": args.state_sizes,
        "chunk_sizes": [window if c == "window" else c for c in args.chunk_sizes],
        "chunk_state_sizes": args.chunk_state_sizes,
        "passkey": {
            "lengths": args.passkey_lengths,
            "depths": args.passkey_depths,
            "trials": args.passkey_trials,
            "max_tokens": args.passkey_max_tokens,
        },
        "seed": args.seed,
        "wall_s": seconds,
    }


def write_outputs(report: dict[str, Any], out_dir: Path, plots: bool) -> None:
    from benchmarks import quality_report  # the plots need matplotlib: only here

    (out_dir / "quality.json").write_text(json.dumps(report, indent=1))
    text = quality_report.markdown(report)
    (out_dir / "quality.md").write_text(text)
    print(text)
    if plots:
        for path in quality_report.write_plots(report, out_dir):
            _progress(f"wrote {path}")


if __name__ == "__main__":
    # `python benchmarks/quality.py` as well as `python -m benchmarks.quality`.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
