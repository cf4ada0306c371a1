"""Markdown tables and PNG plots of a `benchmarks.quality` report (the dict it saves as JSON).

matplotlib is imported inside the plot functions only: the engine does not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLORS = {"tova": "tab:blue", "h2o": "tab:orange", "sink": "tab:green", "window": "tab:red"}


def evicting(report: dict[str, Any]) -> list[str]:
    """The evicting policies (variants included) in the order the run named them."""
    return [p for p in report["settings"]["policies"] if p != "full"]


# ----- markdown ------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    sections = [
        _settings_md(report),
        _perplexity_md(report),
        _checks_md(report),
        _state_md(report),
        _chunks_md(report),
        _passkey_md(report),
        _jobs_md(report),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _settings_md(report: dict[str, Any]) -> str:
    s = report["settings"]
    # The devices the jobs ran on ("auto" resolved); reused jobs keep theirs.
    devices = sorted({j["device"] for j in report["jobs"]}) or s["devices"]
    # Likewise the torch they ran with (jobs from before it was recorded: this one's).
    torch_versions = sorted({j.get("torch", s["torch"]) for j in report["jobs"]}) or [s["torch"]]
    return (
        f"`{s['command']}`\n\n"
        f"Model {s['model']}, {s['dtype']}, on {', '.join(devices)}, "
        f"torch {', '.join(torch_versions)}; "
        f"text {Path(s['text']).name} ({s['text_tokens']} tokens), {s['windows']} window(s) of "
        f"{s['window']} tokens. Jobs took {s['jobs_s'] / 60:.1f} min (model loads included); "
        f"this invocation {s['wall_s'] / 60:.1f} min."
    )


def _sizes(rows: list[dict[str, Any]]) -> list[int]:
    return sorted({r["state_size"] for r in rows if r["policy"] != "full"})


def _full_ppl(report: dict[str, Any]) -> float | None:
    full = [r for r in report["perplexity"] if r["policy"] == "full"]
    return full[0]["ppl"] if full else None


def _perplexity_md(report: dict[str, Any]) -> str:
    rows = report["perplexity"]
    if not rows:
        return ""
    full = _full_ppl(report)
    cells = {(r["policy"], r["state_size"]): r["ppl"] for r in rows}
    sizes = _sizes(rows)
    body = []
    for policy in [p for p in evicting(report) if any(q == p for q, _ in cells)]:
        line: list[object] = [policy]
        for size in sizes:
            ppl = cells.get((policy, size))
            line.append("" if ppl is None else _ppl_cell(ppl, full))
        body.append(line)
    tokens = rows[0]["tokens"]
    head = (
        f"### Perplexity (per-token eviction, {tokens} predicted tokens per configuration)\n\n"
        + (f"Full context: **{full:.3f}**. " if full is not None else "")
        + "Cells: perplexity (change against the full context)."
    )
    return head + "\n\n" + table(["policy", *[f"S={s}" for s in sizes]], body)


def _ppl_cell(ppl: float, full: float | None) -> str:
    if full is None:
        return f"{ppl:.3f}"
    return f"{ppl:.3f} ({100 * (ppl / full - 1):+.1f}%)"


def _checks_md(report: dict[str, Any]) -> str:
    checks = report["checks"]
    if not checks["ordering"]:
        return ""
    failed_best = [s for s, v in checks["ordering"].items() if not v["tova_best"]]
    failed_worst = [s for s, v in checks["ordering"].items() if not v["window_worst"]]
    lines = [
        "### Against the paper's claims",
        "",
        f"- TOVA best at every state size: {_verdict(failed_best)}",
        f"- plain window worst at every state size: {_verdict(failed_worst)}",
    ]
    gap = checks["tova_eighth_gap"]
    if gap is not None:
        ok = "yes" if checks["tova_eighth_within_3_5_percent"] else "no"
        lines.append(
            f"- TOVA at S = {checks['eighth_state_size']} (1/8 of the context) within 3.5% of "
            f"the full model: {ok} ({100 * gap:+.1f}%)"
        )
    return "\n".join(lines)


def _verdict(failed: list) -> str:
    return "yes" if not failed else "no (not at S = " + ", ".join(map(str, failed)) + ")"


def _state_md(report: dict[str, Any]) -> str:
    rows = [r for r in report["perplexity"] if r["policy"] != "full" and "state" in r]
    if not rows:
        return ""
    window = report["settings"]["window"]
    sizes = _sizes(rows)
    size = min(sizes, key=lambda s: abs(s - window // 8))
    body = []
    for r in sorted((r for r in rows if r["state_size"] == size), key=lambda r: r["policy"]):
        st = r["state"]
        top = ", ".join(
            f"{_token(entry)} {100 * entry[1]:.1f}% ({100 * entry[2]:.1f}%)"
            for entry in st["top_kept_first_window"][:5]
        )
        body.append(
            [
                r["policy"],
                f"{100 * st['first_token']:.0f}%",
                f"{100 * st['recent_share']:.0f}%",
                f"{st['median_age']:.0f}",
                top,
            ]
        )
    head = (
        f"### What the state holds at S = {size}, after a {window}-token window "
        "(`return_state`, all layers)"
    )
    headers = [
        "policy",
        "layers keeping token 0",
        "entries a window would hold too",
        "median age",
        "most kept tokens (share of entries; of the text), first window",
    ]
    return head + "\n\n" + table(headers, body)


def _token(entry: list[Any]) -> str:
    """[id, kept share, text share] or, with a tokenizer, [..., text]."""
    return f"`{entry[3]!r}`" if len(entry) > 3 else f"id {entry[0]}"


def _chunks_md(report: dict[str, Any]) -> str:
    rows = report["chunks"]
    if not rows:
        return ""
    window = report["settings"]["window"]
    sizes = sorted({r["state_size"] for r in rows})
    body = []
    for chunk in sorted({r["chunk"] for r in rows}):
        mine = {r["state_size"]: r for r in rows if r["chunk"] == chunk}
        first = next(iter(mine.values()))
        label = f"{chunk} (whole window)" if chunk == window else str(chunk)
        body.append(
            [
                label + (" *" if first["shared_batch"] else ""),
                *[f"{mine[s]['ppl']:.3f}" if s in mine else "" for s in sizes],
                f"{first['prefill_s']:.1f}",
                first["sequences"],
                f"{first['prompt_tokens_per_s']:.0f}",
            ]
        )
    head = (
        "### Prefill chunk size: TOVA perplexity and prefill time\n\n"
        "Each chunk size is one engine run prefilling every state size and window below "
        "together; time is that run's wall time."
    )
    headers = [
        "chunk",
        *[f"ppl S={s}" for s in sizes],
        "prefill s",
        "sequences",
        "prompt tok/s",
    ]
    text = head + "\n\n" + table(headers, body)
    if any(r["shared_batch"] for r in rows):
        text += (
            "\n\n\\* taken from the perplexity part's TOVA run (the same computation); its time "
            "is that run's, which also carried the other state sizes and any passkey prompts."
        )
    return text


def _passkey_md(report: dict[str, Any]) -> str:
    summary = report["passkey"]
    if not summary["trials"]:
        return ""
    accuracy = {(r["policy"], r["state_size"]): r for r in summary["accuracy"]}
    sizes = sorted({s for _p, s in accuracy if s is not None})
    body = [
        [policy, *[_pct(accuracy.get((policy, s))) for s in sizes]]
        for policy in evicting(report)
        if any(p == policy for p, _s in accuracy)
    ]
    s = report["settings"]["passkey"]
    head = (
        "### Passkey retrieval accuracy\n\n"
        f"Lengths {s['lengths']} tokens, key at depths {s['depths']}, {s['trials']} key(s) "
        f"each; greedy, {s['max_tokens']} tokens."
    )
    text = head + "\n\n" + table(["policy", *[f"S={size}" for size in sizes]], body)
    retained = _retained_passkey_md(summary, sizes, evicting(report))
    return text + _full_passkey_md(summary) + retained


def _full_passkey_md(summary: dict[str, Any]) -> str:
    cells = {(c["length"], c["depth"]): c for c in summary["cells"] if c["policy"] == "full"}
    if not cells:
        return ""
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    body = [[length, *[_pct(cells.get((length, d))) for d in depths]] for length in lengths]
    headers = ["full context: length", *[f"depth {d:.0%}" for d in depths]]
    return "\n\n" + table(headers, body)


def _retained_passkey_md(summary: dict[str, Any], sizes: list[int], policies: list[str]) -> str:
    retained = {(r["policy"], r["state_size"]): r for r in summary.get("retained", [])}
    if not retained:
        return ""
    found = next(iter(retained.values()))["n"]
    body = [
        [policy, *[_pct(retained.get((policy, s))) for s in sizes]]
        for policy in policies
        if any(p == policy for p, _s in retained)
    ]
    head = f"Of the {found} keys the full context finds, the share each state still finds:"
    return "\n\n" + head + "\n\n" + table(["policy", *[f"S={s}" for s in sizes]], body)


def _pct(row: dict[str, Any] | None) -> str:
    return "" if row is None else f"{100 * row['accuracy']:.0f}%"


def _jobs_md(report: dict[str, Any]) -> str:
    body = [
        [
            j["name"],
            j["sequences"],
            j["state_size"],
            j["device"],
            f"{j['load_s']:.1f}",
            f"{j['run_s']:.1f}",
        ]
        for j in report["jobs"]
    ]
    headers = ["job (engine)", "sequences", "engine S", "device", "load s", "run s"]
    return "### Jobs\n\n" + table(headers, body)


# ----- plots ---------------------------------------------------------------------------------


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG files for the parts the report holds; none when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")  # files only, no display
    plots = [
        ("perplexity.png", plot_perplexity, bool(report["perplexity"])),
        ("passkey.png", plot_passkey, bool(report["passkey"]["trials"])),
        ("chunks.png", plot_chunks, bool(report["chunks"])),
    ]
    written = []
    for name, plot, wanted in plots:
        if wanted:
            plot(report, out_dir / name)
            written.append(out_dir / name)
    return written


def plot_perplexity(report: dict[str, Any], path: Path) -> None:
    """Perplexity against state size per policy, log x-axis, as the paper's figure."""
    import matplotlib.pyplot as plt

    rows = report["perplexity"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for policy in evicting(report):
        mine = sorted((r["state_size"], r["ppl"]) for r in rows if r["policy"] == policy)
        if mine:
            ax.plot(*zip(*mine, strict=True), "o-", label=policy, color=COLORS.get(policy))
    full = _full_ppl(report)
    if full is not None:
        ax.axhline(full, color="black", linestyle="--", label=f"full ({full:.2f})")
    _log2_ticks(ax, _sizes(rows))
    ax.set_yscale("log")  # a plain window's collapse would flatten the others on a linear axis
    ax.set_xlabel("state size S (entries per layer)")
    ax.set_ylabel("perplexity")
    s = report["settings"]
    ax.set_title(f"{s['model']}: {s['window']}-token windows, per-token eviction", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log2_ticks(ax, values: list[int]) -> None:
    """Log-2 x-axis labelled with the measured values themselves."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [str(v) for v in values])
    ax.minorticks_off()


def plot_passkey(report: dict[str, Any], path: Path) -> None:
    """Retrieval accuracy per (policy, S) row and (length, depth) column."""
    import matplotlib.pyplot as plt

    cells = report["passkey"]["cells"]
    rows = sorted(
        {(c["policy"], c["state_size"]) for c in cells},
        key=lambda k: ((["full", *evicting(report)]).index(k[0]), k[1] or 0),
    )
    cols = sorted({(c["length"], c["depth"]) for c in cells})
    value = {(c["policy"], c["state_size"], c["length"], c["depth"]): c["accuracy"] for c in cells}
    grid = [[value.get((*r, *c), float("nan")) for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * len(cols), 1.2 + 0.28 * len(rows)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), [f"{length}\n{depth:.0%}" for length, depth in cols])
    ax.set_yticks(range(len(rows)), [f"{p} {'all' if s is None else s}" for p, s in rows])
    ax.set_xlabel("prompt length (tokens) / key depth")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title("passkey retrieval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_chunks(report: dict[str, Any], path: Path) -> None:
    """TOVA perplexity and prefill time against the prefill chunk size."""
    import matplotlib.pyplot as plt

    rows = report["chunks"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for size in sorted({r["state_size"] for r in rows}):
        mine = sorted((r["chunk"], r["ppl"]) for r in rows if r["state_size"] == size)
        left.plot(*zip(*mine, strict=True), "o-", label=f"TOVA S={size}")
    full = _full_ppl(report)
    if full is not None:
        left.axhline(full, color="black", linestyle="--", label="full")
    own = sorted({(r["chunk"], r["prefill_s"]) for r in rows if not r["shared_batch"]})
    if own:
        right.plot(*zip(*own, strict=True), "o-", color="tab:purple")
    right.set_title(f"{rows[0]['sequences']} sequences prefilled together", fontsize=9)
    for ax, label in ((left, "perplexity"), (right, "prefill seconds")):
        _log2_ticks(ax, sorted({r["chunk"] for r in rows}))
        ax.set_xlabel("prefill chunk (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    right.set_yscale("log")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
