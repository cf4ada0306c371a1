"""An agent framework's OpenAI adapter, unchanged, against a live server (the embedded
SmolLM2): LangChain's `ChatOpenAI` (langchain-openai), which sends its own set of fields
(`max_completion_tokens`, `stream_options`, `parallel_tool_calls`, `tool_choice`, message
`type`s on the Responses API). Tools bound the LangChain way come back as its tool calls,
whole and streamed, over Chat Completions and over the Responses API, and a tool's result
continues the conversation: on the Responses API from the saved state
(`use_previous_response_id`)."""

from __future__ import annotations

import pytest

from tests.server_utils import API_KEY, SMOL_NAMES

pytest_plugins = ("tests.server_fixtures",)
langchain_openai = pytest.importorskip("langchain_openai")

from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402


class City(BaseModel):
    # Bounded, as a 135M model left free writes a city name without end.
    city: str = Field(max_length=20)


@tool(args_schema=City)
def get_weather(city: str) -> str:
    """The weather now in a city."""
    return f"18 C and sunny in {city}"


ASK = [HumanMessage("What is the weather in Paris?")]


def chat_model(server, responses: bool) -> langchain_openai.ChatOpenAI:
    return langchain_openai.ChatOpenAI(
        model=SMOL_NAMES[0], base_url=f"{server.url}/v1", api_key=API_KEY, temperature=0.7,
        max_tokens=120, extra_body={"seed": 2}, stream_usage=True, max_retries=0,
        use_responses_api=responses, use_previous_response_id=responses)


@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
def test_langchain_tool_calls_and_results(smol_server, responses):
    model = chat_model(smol_server, responses)
    bound = model.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False)
    message = bound.invoke(ASK)
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city"}
    assert len(call["args"]["city"]) <= 20
    assert message.usage_metadata["output_tokens"] < 120
    streamed = None
    for chunk in bound.stream(ASK):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(call["name"], call["args"])]
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = model.invoke([*ASK, message, result])
    assert answer.text and not answer.tool_calls
    if responses:  # continued from the stored response's state, not re-sent
        assert answer.usage_metadata["input_token_details"]["cache_read"] > 0
