"""Request fields this server does not act on (server/http/request_fields.py): the official
`openai` client with every optional Chat Completions and Responses field set gets its answer,
each ignored field logged once; fields nobody declared are ignored with one warning per
name, or refused naming the field under --strict-request-fields; OpenAI-hosted objects and
formats not built yet are refused by name."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import openai
import pytest

from server import ServerSettings, create_app
from server.http import request_fields
from tests.server_utils import call
from tests.tiny_chat_model import save_tiny_chat_model
from tova_engine import AsyncEngine, EngineConfig

MESSAGES = [{"role": "user", "content": "Hi"}]
SETTINGS = ServerSettings(served_model_names=("tiny",))
STRICT = ServerSettings(served_model_names=("tiny",), strict_request_fields=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = save_tiny_chat_model(tmp_path_factory.mktemp("chat-model"))
    engine = AsyncEngine(EngineConfig(model=str(folder), device="cpu", state_size=16,
                                      max_num_seqs=2))
    yield engine
    engine.shutdown()


@pytest.fixture(autouse=True)
def fresh_log_memory(monkeypatch):
    """Each test sees first-time log lines (the set is per process)."""
    monkeypatch.setattr(request_fields, "_logged", set())


def official_client(app) -> openai.AsyncOpenAI:
    transport = httpx.ASGITransport(app=app)
    return openai.AsyncOpenAI(base_url="http://app/v1", api_key="unused",
                              http_client=httpx.AsyncClient(transport=transport))


def ignored_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "accepted and ignored" in r.getMessage()]


def test_every_openai_chat_field_through_the_official_client(engine, caplog):
    client = official_client(create_app(engine, SETTINGS))
    fields = dict(
        store=True, metadata={"team": "a"}, service_tier="auto", reasoning_effort="low",
        verbosity="low", prompt_cache_key="k1", safety_identifier="u-1", user="u-1",
        modalities=["text"], prediction={"type": "content", "content": "Hello"},
        web_search_options={}, parallel_tool_calls=True, seed=3, logprobs=True,
        top_logprobs=2, frequency_penalty=0.1, presence_penalty=0.1, logit_bias={"5": 1},
        n=1, stop=["\n\n"], temperature=0.7, top_p=0.9, max_completion_tokens=4,
    )

    async def twice():
        first = await client.chat.completions.create(model="tiny", messages=MESSAGES, **fields)
        again = await client.chat.completions.create(model="tiny", messages=MESSAGES, **fields)
        return first, again

    with caplog.at_level(logging.WARNING, logger="server"):
        first, again = asyncio.run(twice())
    assert first.choices[0].finish_reason in ("length", "stop")
    assert first.choices[0].logprobs is not None and again.id != first.id
    lines = ignored_lines(caplog)
    for name in ("store", "metadata", "service_tier", "reasoning_effort", "verbosity",
                 "prompt_cache_key", "safety_identifier", "user", "modalities", "prediction",
                 "web_search_options"):
        assert sum(f"'{name}'" in line for line in lines) == 1, name  # once, not per request


def test_every_openai_responses_field_through_the_official_client(engine, caplog):
    client = official_client(create_app(engine, SETTINGS))

    async def create():
        return await client.responses.create(
            model="tiny", input="Hi", max_output_tokens=4, background=False, include=[],
            max_tool_calls=2, prompt_cache_key="k", safety_identifier="u", service_tier="auto",
            reasoning={"effort": "low"}, top_logprobs=0, user="u", truncation="disabled",
            text={"format": {"type": "text"}, "verbosity": "low"}, store=False,
            metadata={"a": "b"}, parallel_tool_calls=False, tool_choice="auto",
        )

    with caplog.at_level(logging.WARNING, logger="server"):
        response = asyncio.run(create())
    assert response.status == "incomplete" and response.output_text is not None
    lines = ignored_lines(caplog)
    assert any("'background'" in line for line in lines)
    assert any("'reasoning'" in line for line in lines)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": "Hi", "mood": "x"}], "max_tokens": 2},
     "messages.0.mood"),
    ("/v1/chat/completions",
     {"messages": MESSAGES, "max_tokens": 2, "response_format": {"type": "text", "x": 1}},
     "response_format.x"),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 2, "flavour": "x"}, "flavour"),
    ("/tokenize", {"prompt": "Hi", "wat": 1}, "wat"),
])
def test_fields_nobody_declared_are_ignored_or_refused_when_strict(engine, caplog, path, body,
                                                                   param):
    lenient = create_app(engine, SETTINGS)
    with caplog.at_level(logging.WARNING, logger="server"):
        for _ in range(2):
            response = call(lenient, "POST", path, json=body)
            assert response.status_code == 200, response.text
    warned = [r.getMessage() for r in caplog.records
              if "ignoring request field" in r.getMessage()]
    pattern = param.replace(".0.", ".*.")
    assert len(warned) == 1 and f"'{pattern}'" in warned[0]
    strict = create_app(engine, STRICT)
    response = call(strict, "POST", path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"] == f"Unrecognized request argument supplied: {param}"


def test_openai_fields_pass_even_when_strict(engine):
    strict = create_app(engine, STRICT)
    body = {"messages": MESSAGES, "max_tokens": 2, "store": False, "service_tier": "auto"}
    assert call(strict, "POST", "/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format",
     "needs a schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
     "text.format.schema", "invalid json"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "stored at OpenAI"),
    ({"conversation": "conv_1"}, "conversation", "stored at OpenAI"),
    ({"background": "soon"}, "background", ""),  # accepted and ignored, but typed
])
def test_what_would_change_the_answer_is_refused_by_name(engine, body, param, words):
    app = create_app(engine, SETTINGS)
    response = call(app, "POST", "/v1/responses", json={"input": "Hi", **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_compact_json_by_default_and_whitespace_where_asked():
    """structured_outputs.disable_any_whitespace (vLLM's) over the server's default."""
    from server.protocol.chat import ChatCompletionRequest
    from server.serving.structured import structured_outputs

    def spec(server_allows: bool, **given):
        body = ChatCompletionRequest(messages=MESSAGES, **given)
        return structured_outputs(body, server_allows)

    plain = {"response_format": {"type": "json_object"}}
    assert spec(False, **plain).any_whitespace is False
    assert spec(True, **plain).any_whitespace is True
    allowed = {"structured_outputs": {"json_object": True, "disable_any_whitespace": False}}
    assert spec(False, **allowed).any_whitespace is True
    compact = {"structured_outputs": {"json": {"type": "object"}, "disable_any_whitespace": True}}
    assert spec(True, **compact).any_whitespace is False


def test_the_server_flag_reaches_the_constraint(engine):
    from server.cli import build_parser, configs

    _, settings = configs(build_parser().parse_args(["--structured-outputs-any-whitespace"]))
    assert settings.disable_any_whitespace is False
    app = create_app(engine, ServerSettings(served_model_names=("tiny",),
                                            disable_any_whitespace=False))
    body = {"messages": MESSAGES, "max_tokens": 4, "response_format": {"type": "json_object"}}
    assert call(app, "POST", "/v1/chat/completions", json=body).status_code == 200


def test_evictions_are_reported_in_usage_and_headers(engine):
    """A 40-token prompt through a 16-entry state with 6 tokens out: it read 40 + 5 tokens
    and holds 16, in usage.state_details (streamed usage too) and the headers."""
    app = create_app(engine, SETTINGS)
    prompt = list(range(3, 43))
    body = {"prompt": prompt, "max_tokens": 6, "ignore_eos": True}
    response = call(app, "POST", "/v1/completions", json=body)
    assert response.json()["usage"]["state_details"] == {
        "state_size": 16, "prompt_tokens_evicted": 24, "tokens_evicted": 29}
    assert response.headers["x-tova-state-size"] == "16"
    assert response.headers["x-tova-prompt-tokens-evicted"] == "24"
    # Two choices of a request with its own state size, streamed with usage.
    stream = call(app, "POST", "/v1/completions", json={
        **body, "n": 2, "state_size": 8, "stream": True,
        "stream_options": {"include_usage": True}})
    assert stream.headers["x-tova-prompt-tokens-evicted"] == "32"
    last = [line for line in stream.text.splitlines() if line.startswith("data: {")][-1]
    usage = json.loads(last.removeprefix("data: "))["usage"]
    assert usage["state_details"] == {"state_size": 8, "prompt_tokens_evicted": 32,
                                      "tokens_evicted": 2 * 37}


def test_the_official_client_keeps_the_state_details(engine):
    client = official_client(create_app(engine, SETTINGS))
    result = asyncio.run(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "word " * 30}], max_tokens=3))
    details = result.usage.model_extra["state_details"]
    assert details["state_size"] == 16 and details["prompt_tokens_evicted"] > 0


def test_responses_follow_a_json_schema_through_the_official_client(engine):
    """text.format json_schema (the Responses API's structured output): the answer parses
    and validates, compact, and the response echoes the format."""
    import jsonschema

    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]},
                                               "n": {"enum": [1, 2]}},
              "required": ["colour", "n"], "additionalProperties": False}
    client = official_client(create_app(engine, SETTINGS))
    response = asyncio.run(client.responses.create(
        model="tiny", input="Pick", max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "pick", "schema": schema,
                         "strict": True}}))
    jsonschema.validate(json.loads(response.output_text), schema)
    assert " " not in response.output_text  # compact
    assert response.text.format.type == "json_schema" and response.text.format.name == "pick"


def test_responses_report_what_the_state_dropped_across_turns(engine):
    """A continued turn's input counts what its state stands for: the counts follow it."""
    client = official_client(create_app(engine, SETTINGS))

    async def two_turns():
        first = await client.responses.create(model="tiny", input="word " * 20,
                                              max_output_tokens=3)
        second = await client.responses.create(model="tiny", input="more",
                                               previous_response_id=first.id,
                                               max_output_tokens=3)
        return first, second

    for response in asyncio.run(two_turns()):
        usage = response.usage
        details = usage.model_extra["state_details"]
        read = usage.input_tokens + usage.output_tokens - 1
        assert details == {"state_size": 16,
                           "prompt_tokens_evicted": max(0, usage.input_tokens - 16),
                           "tokens_evicted": max(0, read - 16)}
        assert details["prompt_tokens_evicted"] > 0


def test_a_stored_response_written_before_kv_cache_dtype_existed_still_loads():
    """Files the store wrote before the spec gained kv_cache_dtype: its default holds."""
    from server.serving.responses_store import StoredResponse

    old = json.dumps({"response": {"id": "resp_1"}, "last_token_id": 5, "model": "m",
                      "dtype": "float32", "state_size": 16, "capacity": 16, "policy": "tova"})
    record = StoredResponse.from_json(old)
    assert record.spec.kv_cache_dtype == "auto" and record.id == "resp_1"
    assert StoredResponse.from_json(record.to_json()) == record


def test_a_stored_responses_input_items(engine):
    """GET /v1/responses/{id}/input_items through the official client: newest first by
    default, ids kept, pages by limit and after."""
    client = official_client(create_app(engine, SETTINGS))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello", "id": "msg_given"},
                {"role": "user", "content": "Again"}]

    async def run():
        response = await client.responses.create(model="tiny", input=messages,
                                                 max_output_tokens=2)
        newest = await client.responses.input_items.list(response.id)
        oldest = await client.responses.input_items.list(response.id, order="asc", limit=2)
        rest = await client.responses.input_items.list(response.id, order="asc",
                                                       after=oldest.data[-1].id)
        return newest, oldest, rest

    newest, oldest, rest = asyncio.run(run())
    assert [item.role for item in newest.data] == ["user", "assistant", "user", "system"]
    assert newest.data[1].id == "msg_given" and newest.data[1].content[0].type == "output_text"
    assert newest.data[2].content[0].text == "Hi"
    assert [item.role for item in oldest.data] == ["system", "user"] and oldest.has_more
    assert [item.id for item in rest.data] == [newest.data[1].id, newest.data[0].id]
    app = create_app(engine, SETTINGS)
    assert call(app, "GET", "/v1/responses/resp_missing/input_items").status_code == 404
