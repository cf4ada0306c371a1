"""Function tools on /v1/responses against a live server (the embedded SmolLM2, whose
template knows no tools: the hermes listing), through the official `openai` client: calls
come back as function_call items whose arguments follow their schemas, the client sends the
outputs back with `previous_response_id` and the conversation continues from the saved state
(which the stop after the calls kept); streamed events come in OpenAI's order and the client
assembles them to the same response; parallel_tool_calls and max_tool_calls bound the calls;
bad tool input is a 400 naming the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server_utils import SMOL_NAMES, auth_headers
from tests.test_server_tools import SCHEMAS, TIME, WEATHER  # chat's tools, flat here

pytest_plugins = ("tests.server_fixtures",)

MODEL = SMOL_NAMES[0]
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather now",
          "parameters": WEATHER, "strict": True},
         {"type": "function", "name": "get_time", "parameters": TIME}]
ASK = "What is the weather in Paris?"


def create(client, **kwargs):
    options = {"model": MODEL, "input": ASK, "tools": TOOLS, "max_output_tokens": 120,
               "temperature": 0.7, "extra_body": {"seed": 2}, **kwargs}
    return client.responses.create(**options)


def calls_of(response) -> list:
    calls = [item for item in response.output if item.type == "function_call"]
    for call in calls:
        assert call.call_id.startswith("call_") and call.id.startswith("fc_")
        assert call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    return calls


def test_calls_then_their_outputs_continue_the_conversation(client):
    first = create(client, tool_choice="required", parallel_tool_calls=False)
    assert first.status == "completed"
    [call] = calls_of(first)
    assert first.tool_choice == "required" and first.parallel_tool_calls is False
    assert [tool.name for tool in first.tools] == ["get_weather", "get_time"]
    # The stop after the one call kept the state: the outputs continue from it.
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=TOOLS, max_output_tokens=16,
        temperature=0, input=[{"type": "function_call_output", "call_id": call.call_id,
                               "output": json.dumps({"temperature": 18, "unit": "celsius"})}])
    assert second.status in ("completed", "incomplete") and second.output_text
    continued = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens == continued
    listed = client.responses.input_items.list(second.id)
    assert [item.type for item in listed.data] == ["function_call_output"]
    assert listed.data[0].call_id == call.call_id


def test_parallel_calls_are_distinct_and_bounded(client):
    both = create(client, tool_choice="required", max_output_tokens=200)
    calls = calls_of(both)
    assert len({(c.name, c.arguments) for c in calls}) == len(calls)
    assert both.usage.output_tokens < 200  # stopped at a repeat, not at max_output_tokens
    assert both.output_text == ""
    one = create(client, tool_choice="required", max_tool_calls=1, max_output_tokens=200)
    assert len(calls_of(one)) == 1 and one.max_tool_calls == 1


def test_a_named_function_is_the_one_called(client):
    out = create(client, tool_choice={"type": "function", "name": "get_time"})
    assert [call.name for call in calls_of(out)] == ["get_time"]


def test_the_stream_gives_the_same_response_in_openais_order(client):
    with client.responses.stream(model=MODEL, input=ASK, tools=TOOLS, tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=120,
                                 temperature=0.7, extra_body={"seed": 2}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    [call] = calls_of(final)
    plain = create(client, tool_choice="required", parallel_tool_calls=False, store=False)
    [same] = calls_of(plain)
    assert (call.name, call.arguments) == (same.name, same.arguments)
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]


def test_auto_gives_text_or_calls_and_none_gives_text(client):
    for seed in (1, 3):
        out = create(client, tool_choice="auto", extra_body={"seed": seed}, store=False)
        kinds = {item.type for item in out.output}
        assert kinds <= {"message", "function_call"} and kinds
        calls_of(out)
    text = create(client, tool_choice="none", max_output_tokens=12, store=False)
    assert [item.type for item in text.output] == ["message"] and text.output_text


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
     "tools.0.parameters"),
    ({"tools": [*TOOLS, TOOLS[0]]}, "tools.2.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required",
      "text": {"format": {"type": "json_object"}}}, "tool_choice"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["x"]}]}, "tools"),
    ({"input": [{"type": "function_call_output", "call_id": "call_nope", "output": "1"}]},
     "input.0.call_id"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "get_time",
                 "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c2", "output": "1"}]},
     "input.1.call_id"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"max_tool_calls": 0}, "max_tool_calls"),
])
def test_bad_tool_input_names_the_field(smol_server, fields, param):
    body = {"model": MODEL, "input": ASK, "max_output_tokens": 4, **fields}
    response = httpx.post(f"{smol_server.url}/v1/responses", json=body,
                          headers=auth_headers(), timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_an_output_for_a_call_the_previous_response_did_not_make(client):
    first = create(client, tool_choice="required", parallel_tool_calls=False)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model=MODEL, previous_response_id=first.id, max_output_tokens=4,
            input=[{"type": "function_call_output", "call_id": "call_other", "output": "1"}])
    assert info.value.body["param"] == "input.0.call_id"
    assert "previous response" in info.value.body["message"]


def test_a_whole_history_without_a_stored_state(client):
    """A client that keeps the history itself (store false) sends the calls and outputs back
    as items: they render as the assistant's calls and a tool result."""
    first = create(client, tool_choice="required", parallel_tool_calls=False, store=False)
    [call] = calls_of(first)
    history = [{"role": "user", "content": ASK},
               {"type": "function_call", "call_id": call.call_id, "name": call.name,
                "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}]
    out = client.responses.create(model=MODEL, input=history, max_output_tokens=12,
                                  temperature=0, store=False)
    assert out.output_text and out.status in ("completed", "incomplete")
