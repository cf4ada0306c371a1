"""A long chat, turn after turn, three ways: the Responses API continuing each turn from the
saved state (`previous_response_id`), chat completions re-sending the whole history to a
`tova` server, and chat completions re-sending it to a `full` server.

Each turn sends about --user-tokens new tokens (windows of a text file, or random words) and
generates --answer-tokens (greedy, `ignore_eos`), streamed. Per turn it records the time to
first token and the prompt tokens the engine computed (from /metrics: one conversation runs at
a time, so the counter's step is that turn's), and per way the state memory a conversation
holds. Prints a table, saves JSON and a plot of TTFT against the turn.

    python benchmarks/conversation.py --launch "--state-size 256" \\
        --launch-full "--policy full --state-size 8192" --turns 32 --out-dir conv-out
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve import launched, random_text, scrape

WAYS = ("responses", "chat_tova", "chat_full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8231",
                   help="the tova server (Responses and re-sent chat)")
    p.add_argument("--full-base-url", default="http://127.0.0.1:8232",
                   help="the server with --policy full (re-sent chat)")
    p.add_argument("--launch", default=None, metavar="SERVER_FLAGS",
                   help="start `python -m server SERVER_FLAGS` on --base-url's port first")
    p.add_argument("--launch-full", default=None, metavar="SERVER_FLAGS",
                   help="the same for --full-base-url (give it --policy full)")
    p.add_argument("--turns", type=int, default=32)
    p.add_argument("--user-tokens", type=int, default=100)
    p.add_argument("--answer-tokens", type=int, default=100)
    p.add_argument("--dataset-path", default=None, help="text to cut user turns from")
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    p.add_argument("--warmup-turns", type=int, default=2,
                   help="a throw-away conversation of this many turns first, per server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.turns < 2:
        p.error("--turns must be at least 2")
    return args


# ----- the user's side ----------------------------------------------------------------------


def user_turns(client: httpx.Client, args: argparse.Namespace) -> list[str]:
    """--turns texts of --user-tokens tokens each (by the server's tokenizer)."""
    rng = random.Random(args.seed)
    if args.dataset_path:
        text = Path(args.dataset_path).read_text(encoding="utf-8", errors="replace")
    else:
        text = random_text(args.user_tokens * args.turns * 2, rng)
    ids = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    ids.raise_for_status()
    tokens = ids.json()["tokens"]
    need = args.user_tokens * args.turns
    if len(tokens) < need:
        sys.exit(f"the text has {len(tokens)} tokens; {need} are needed")
    start = rng.randrange(len(tokens) - need + 1)
    turns = []
    for i in range(args.turns):
        window = tokens[start + i * args.user_tokens : start + (i + 1) * args.user_tokens]
        detok = client.post("/detokenize", json={"tokens": window})
        detok.raise_for_status()
        turns.append(detok.json()["prompt"])
    return turns


def prompt_tokens_total(client: httpx.Client) -> float:
    return sum(v for (name, _), v in scrape(client).items() if name == "tova_prompt_tokens_total")


def stream_ttft(client: httpx.Client, path: str, body: dict) -> tuple[float, str, dict]:
    """(seconds to the first text, the whole text, the last event) of one streamed call."""
    started = time.perf_counter()
    ttft, parts, last = None, [], {}
    with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            sys.exit(f"{path}: HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event and isinstance(event["error"], dict):
                sys.exit(f"{path}: {event['error']}")
            text = _text_of(event)
            if text:
                if ttft is None:
                    ttft = time.perf_counter() - started
                parts.append(text)
            last = event
    return (ttft if ttft is not None else time.perf_counter() - started), "".join(parts), last


def _text_of(event: dict) -> str:
    if event.get("type") == "response.output_text.delta":
        return event["delta"]
    choices = event.get("choices") or []
    if choices:
        return choices[0].get("delta", {}).get("content") or ""
    return ""


# ----- the three ways -----------------------------------------------------------------------


def run_responses(client: httpx.Client, turns: list[str], args) -> list[dict]:
    rows, previous = [], None
    for user in turns:
        body = {"input": user, "max_output_tokens": args.answer_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        if previous is not None:
            body["previous_response_id"] = previous
        before = prompt_tokens_total(client)
        ttft, _, last = stream_ttft(client, "/v1/responses", body)
        response = last["response"]
        previous = response["id"]
        usage = response["usage"]
        rows.append({"ttft_s": ttft, "prefill_tokens": prompt_tokens_total(client) - before,
                     "context_tokens": usage["input_tokens"],
                     "cached_tokens": usage["input_tokens_details"]["cached_tokens"]})
    return rows


def run_chat(client: httpx.Client, turns: list[str], args) -> list[dict]:
    rows, history = [], []
    for user in turns:
        history.append({"role": "user", "content": user})
        body = {"messages": history, "max_tokens": args.answer_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        before = prompt_tokens_total(client)
        ttft, text, last = stream_ttft(client, "/v1/chat/completions", body)
        history.append({"role": "assistant", "content": text})
        rows.append({"ttft_s": ttft, "prefill_tokens": prompt_tokens_total(client) - before,
                     "context_tokens": last["usage"]["prompt_tokens"], "cached_tokens": 0})
    return rows


def state_memory(client: httpx.Client, way: str, rows: list[dict]) -> dict:
    """Bytes of state one conversation holds: the fixed-size state (tova, a saved state per
    stored response), or what the full cache's entries in use take."""
    info = {(n, lbl): v for (n, lbl), v in scrape(client).items()}
    labels = next(lbl for (n, lbl) in info if n == "tova_engine_info")
    engine = dict(labels)
    slots = next(v for (n, _), v in info.items() if n == "tova_state_slots_capacity")
    total = next(v for (n, _), v in info.items() if n == "tova_state_memory_bytes")
    per_slot = total / (slots + (1 if engine.get("device", "").startswith("cuda") else 0))
    state_size = int(engine["state_size"])
    if way == "chat_full":
        used = min(rows[-1]["context_tokens"] + 100, state_size)
        return {"bytes": per_slot * used / state_size, "allocated_bytes": per_slot,
                "note": f"entries in use at the last turn: {used} of {state_size}"}
    return {"bytes": per_slot, "allocated_bytes": per_slot,
            "note": f"state_size {state_size}, whatever the conversation's length"}


# ----- report -------------------------------------------------------------------------------


def report(results: dict[str, dict], args) -> None:
    ways = list(results)
    print("| turn | " + " | ".join(f"{w} TTFT ms | {w} prefill tokens" for w in ways) + " |")
    print("|---|" + "---|---|" * len(ways))
    for turn in range(args.turns):
        cells = []
        for way in ways:
            row = results[way]["turns"][turn]
            cells += [f"{1e3 * row['ttft_s']:.1f}", f"{row['prefill_tokens']:.0f}"]
        print(f"| {turn + 1} | " + " | ".join(cells) + " |")
    print()
    for way in ways:
        rows = results[way]["turns"]
        ratio = rows[-1]["ttft_s"] / rows[1]["ttft_s"]
        memory = results[way]["state_memory"]
        results[way]["ttft_last_over_second"] = ratio
        print(f"{way}: TTFT turn {args.turns} / turn 2 = {ratio:.2f}x; state per conversation "
              f"{memory['bytes'] / 2**20:.1f} MiB ({memory['note']})")


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for way, result in results.items():
        turns = range(1, len(result["turns"]) + 1)
        axis.plot(turns, [1e3 * r["ttft_s"] for r in result["turns"]], marker="o",
                  markersize=3, label=way.replace("_", " "))
    axis.set_xlabel("turn")
    axis.set_ylabel("time to first token (ms)")
    axis.set_title("TTFT per turn of one conversation")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results: dict[str, dict] = {}
    tova = argparse.Namespace(launch=args.launch, base_url=args.base_url)
    with launched(tova), httpx.Client(base_url=args.base_url, timeout=600) as client:
        turns = user_turns(client, args)
        for way, run in (("responses", run_responses), ("chat_tova", run_chat)):
            if way in args.ways:
                if args.warmup_turns:  # first steps at a shape are slow (kernels, graphs)
                    run(client, turns[-args.warmup_turns:], args)
                rows = run(client, turns, args)
                results[way] = {"turns": rows, "state_memory": state_memory(client, way, rows)}
    if "chat_full" in args.ways:
        full = argparse.Namespace(launch=args.launch_full, base_url=args.full_base_url)
        with launched(full), httpx.Client(base_url=args.full_base_url, timeout=600) as client:
            if args.warmup_turns:
                run_chat(client, turns[-args.warmup_turns:], args)
            rows = run_chat(client, turns, args)
            results["chat_full"] = {"turns": rows,
                                    "state_memory": state_memory(client, "chat_full", rows)}
    report(results, args)
    summary = {"settings": {k: v for k, v in vars(args).items()}, "results": results}
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "conversation.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot(results, out / "conversation-ttft.png")
    return summary


if __name__ == "__main__":
    main()

