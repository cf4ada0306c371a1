"""The Responses API through the official `openai` client against a live server (a tiny model
with a real tokenizer and ChatML template): create, stream, retrieve, delete, and
`previous_response_id` continuing from the saved state, prefilling only the new turn; bad
input gets a clear 4xx; stored responses survive a restart; the store's budgets drop the
least recently used."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest

from tests.server_utils import ServerProcess, scrape
from tests.tiny_chat_model import save_tiny_chat_model

MODEL = "tiny-chat"
TURN = dict(model=MODEL, max_output_tokens=6, temperature=0, extra_body={"ignore_eos": True})


def serve(model, folder, store_dir, *extra: str) -> ServerProcess:
    return ServerProcess([
        "--model", str(model), "--device", "cpu", "--dtype", "float32", "--state-size", "16",
        "--max-num-seqs", "4", "--prefill-chunk-size", "8", "--state-store-dir", str(store_dir),
        "--served-model-name", MODEL, *extra,
    ], folder / f"server-{len(list(folder.glob('server-*')))}.log").wait_ready()


def client_of(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("chat-model"))


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("responses")
    process = serve(chat_model, folder, folder / "states")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return client_of(server)


def prompt_tokens(server) -> float:
    return scrape(server.url).get("tova_prompt_tokens_total", model_name=MODEL)


def test_create_and_continue_prefills_only_the_new_turn(server, client):
    first = client.responses.create(input="Hello there", **TURN)
    assert first.object == "response" and first.id.startswith("resp_")
    assert first.status == "incomplete" and first.incomplete_details.reason == "max_output_tokens"
    assert first.usage.output_tokens == 6 and first.usage.input_tokens_details.cached_tokens == 0
    assert len(first.output_text) > 0 and first.output[0].content[0].type == "output_text"
    before = prompt_tokens(server)
    second = client.responses.create(input="And then?", previous_response_id=first.id, **TURN)
    prefilled = prompt_tokens(server) - before
    stood_for = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens == stood_for
    new_tokens = second.usage.input_tokens - stood_for
    # "<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n" in bytes,
    # and the last answer token the state had not read yet.
    assert new_tokens == prefilled - 1
    assert prefilled < second.usage.input_tokens
    assert second.previous_response_id == first.id


def test_concurrent_continuations_of_one_response_agree(client):
    first = client.responses.create(input="Tell me a story", **TURN)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(
            lambda _: client.responses.create(
                input="Go on", previous_response_id=first.id, **TURN).output_text,
            range(3)))
    assert texts[0] == texts[1] == texts[2]


def test_streaming_events_in_order(client):
    first = client.responses.create(input="Hi", **TURN)
    deltas, kinds = [], []
    with client.responses.stream(input="Again", previous_response_id=first.id,
                                 **TURN) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        # Cut by max_output_tokens: "response.incomplete" (the client's helper, as with
        # OpenAI, has a final response only for "response.completed").
        final = event.response
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert final.output_text == "".join(deltas) and final.usage.output_tokens == 6
    events = list(client.responses.create(input="Once more", previous_response_id=final.id,
                                          stream=True, **TURN))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_retrieve_delete_and_not_found(client, server):
    first = client.responses.create(input="Remember this", metadata={"k": "v"}, **TURN)
    got = client.responses.retrieve(first.id)
    assert got.output_text == first.output_text and got.metadata == {"k": "v"}
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(input="x", previous_response_id=first.id, **TURN)
    assert info.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input="x", previous_response_id="resp_" + "0" * 32, **TURN)
    unstored = client.responses.create(input="Forget this", store=False, **TURN)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_bad_input_is_a_clear_4xx_and_leaks_no_slot(client, server):
    first = client.responses.create(input="Hello", **TURN)
    bad = [
        (dict(input=[{"role": "robot", "content": "hi"}]), "input"),
        (dict(input=[]), "input"),
        (dict(input="x", previous_response_id=first.id, extra_body={"state_size": 8}),
         "previous_response_id"),
        (dict(input="x" * 5000, previous_response_id=first.id), "input"),
        (dict(input="x", tools=[{"type": "web_search"}]), "tools"),
        (dict(input="x", tool_choice="required"), "tool_choice"),
        (dict(input=[{"type": "function_call_output", "call_id": "call_x", "output": "1"}]),
         "input.0.call_id"),
    ]
    for kwargs, param in bad:
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(**{"model": MODEL, "max_output_tokens": 4, **kwargs})
        assert info.value.body["param"] == param, kwargs
    assert scrape(server.url).get("tova_state_slots_used", model_name=MODEL) == 0


def test_store_metrics(client, server):
    first = client.responses.create(input="Count me", **TURN)
    client.responses.create(input="And me", previous_response_id=first.id, **TURN)
    metrics = scrape(server.url)
    assert metrics.get("tova_state_store_hits_total", model_name=MODEL) >= 1
    assert metrics.get("tova_state_restores_total", model_name=MODEL) >= 1
    assert metrics.get("tova_state_store_snapshots", model_name=MODEL, tier="host") >= 2


def test_stored_responses_survive_a_restart(chat_model, tmp_path):
    store = tmp_path / "states"
    server = serve(chat_model, tmp_path, store, "--state-store-memory-bytes", "0")
    try:
        client = client_of(server)
        first = client.responses.create(input="Before the restart", **TURN)
        before = client.responses.create(input="Next", previous_response_id=first.id, **TURN)
    finally:
        server.stop()
    server = serve(chat_model, tmp_path, store, "--state-store-memory-bytes", "0")
    try:
        client = client_of(server)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        after = client.responses.create(input="Next", previous_response_id=first.id, **TURN)
        assert after.output_text == before.output_text
    finally:
        server.stop()


def test_full_disk_tier_drops_the_least_recently_used(chat_model, tmp_path):
    # One full state of the tiny model: 2 layers x 2 kv heads x 16 entries x 16 dims x 4
    # bytes x (K, V) = 8 KiB, plus positions and the file's header: about 8.8 KiB. Two fit
    # in 20 KiB, three do not.
    server = serve(chat_model, tmp_path, tmp_path / "states", "--state-store-memory-bytes", "0",
                   "--state-store-disk-bytes", str(20 * 1024))
    try:
        client = client_of(server)
        ids = [client.responses.create(input=f"Turn {i} " * 3, **TURN).id for i in range(3)]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[0])
        with pytest.raises(openai.NotFoundError):
            client.responses.create(input="x", previous_response_id=ids[0], **TURN)
        for kept in ids[1:]:  # (store=False: a new state would push the others out)
            client.responses.create(input="still here", previous_response_id=kept,
                                    store=False, **TURN)
        metrics = scrape(server.url)
        assert metrics.get("tova_state_store_evictions_total", model_name=MODEL) >= 1
    finally:
        server.stop()


def test_fifty_turns_prefill_only_each_new_turn_in_a_constant_state(server, client):
    """Through previous_response_id: each turn the engine computes the new turn's tokens and
    the one answer token its state had not read, however long the conversation; keeping only
    the latest response, the store holds one state of one size."""
    previous, sizes = None, set()
    for turn in range(50):
        before = prompt_tokens(server)
        response = client.responses.create(input=f"turn {turn}", previous_response_id=previous,
                                           max_output_tokens=3, temperature=0,
                                           model=MODEL, extra_body={"ignore_eos": True})
        computed = prompt_tokens(server) - before
        usage = response.usage
        new = usage.input_tokens - usage.input_tokens_details.cached_tokens
        assert computed == new + (0 if previous is None else 1), turn
        if previous is not None:
            client.responses.delete(previous)
            metrics = scrape(server.url)
            sizes.add(metrics.get("tova_state_store_bytes", model_name=MODEL, tier="host")
                      / metrics.get("tova_state_store_snapshots", model_name=MODEL, tier="host"))
        previous = response.id
    assert usage.input_tokens > 50 * 10
    assert len(sizes) == 1
