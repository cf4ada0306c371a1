"""Tool calling against a live server (the embedded SmolLM2, whose template knows no tools:
the documented system-prompt format), through the official OpenAI client: required and named
calls parse and match their schemas (checked with `jsonschema`), streaming deltas assemble in
the client, a history with calls and results renders, auto mode parses what the model wrote,
and bad input is refused naming the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.server_utils import SMOL_NAMES, auth_headers

pytest_plugins = ("tests.server_fixtures",)

MODEL = SMOL_NAMES[0]
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 20},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def create(client, **kwargs):
    options = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 120,
               "temperature": 0.7, "seed": 2, **kwargs}
    return client.chat.completions.create(**options)


def check_calls(calls, names=SCHEMAS) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), names[call.function.name])


def test_required_gives_calls_that_parse_and_match_their_schemas(client):
    out = create(client, tool_choice="required", n=2, parallel_tool_calls=False)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls)


def test_parallel_calls_stop_when_they_repeat(client):
    """The grammar lets calls follow one another, and this small model repeats its call
    until max_tokens when let: the choice ends at the first repeat, which is dropped, well
    before max_tokens; streamed, the same calls and no content."""
    for seed in (2,):
        out = create(client, tool_choice="required", max_tokens=200, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls)
        keys = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        assert len(set(keys)) == len(keys)
        assert out.usage.completion_tokens < 200
        assert choice.message.content is None
        stream = create(client, tool_choice="required", max_tokens=200, seed=seed, stream=True,
                        stream_options={"include_usage": True})
        chunks = list(stream)
        streamed = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls or ()]
        assert [(d.function.name, d.function.arguments) for d in streamed] == keys
        assert not "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
        assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] \
            == ["tool_calls"]
        assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_a_named_function_is_the_one_called(client):
    out = create(client, tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_time"
    check_calls([call])


def test_no_parallel_calls_gives_one_call(client):
    out = create(client, tool_choice="required", parallel_tool_calls=False, seed=9)
    assert len(out.choices[0].message.tool_calls) == 1


def test_streamed_calls_assemble_in_the_client(client):
    with client.beta.chat.completions.stream(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120,
            temperature=0.7, seed=2, parallel_tool_calls=False) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls)
    plain = create(client, tool_choice="required", parallel_tool_calls=False)  # not streamed
    assert [c.function.arguments for c in choice.message.tool_calls] == \
        [c.function.arguments for c in plain.choices[0].message.tool_calls]


def test_a_history_with_a_call_and_its_result(client):
    messages = [*ASK, {"role": "assistant", "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'}]
    out = create(client, messages=messages, tool_choice="none", max_tokens=20)
    choice = out.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")


def test_auto_returns_text_or_calls(client):
    out = create(client, tool_choice="auto", n=3, temperature=1.0)
    for choice in out.choices:
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                assert call.function.name in SCHEMAS
                json.loads(call.function.arguments)
        else:
            assert choice.message.content is not None


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "nonsense"}}}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}]}, "tools.0.function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools.0.function.name"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "messages.1.tool_call_id"),
    ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages.1.tool_call_id"),
    ({"messages": [{"role": "assistant"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "a"}]},
     "messages.0.tool_call_id"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
])
def test_bad_tool_input_names_the_field(smol_server, fields, param):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **fields}
    response = httpx.post(f"{smol_server.url}/v1/chat/completions", json=body,
                          headers=auth_headers(), timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
