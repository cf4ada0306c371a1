"""Structured outputs against a live server (the embedded SmolLM2), through the official OpenAI
client: every constrained output is checked by an independent validator (`jsonschema`,
`json`, `re.fullmatch`), with sampling (not greedy), n > 1, streaming, logprobs, stop strings
and a max_tokens that cuts the JSON short."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from tests.server_utils import SMOL_NAMES, auth_headers

pytest_plugins = ("tests.server_fixtures",)

MODEL = SMOL_NAMES[0]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"enum": ["en", "fr", "de"]}, "maxItems": 2},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON: name, age and languages."}]


def chat(client, **kwargs):
    options = {"max_tokens": 80, "temperature": 0.9, "seed": 3, **kwargs}
    return client.chat.completions.create(model=MODEL, messages=ASK, **options)


def test_json_schema_response_format_gives_valid_json(client):
    out = chat(client, n=3, response_format={"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON, "strict": True}})
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_the_clients_parse_helper_with_a_pydantic_model(client):
    class City(BaseModel):
        name: str
        country: str
        population: int

    out = client.chat.completions.parse(
        model=MODEL, max_tokens=80, temperature=0.7, seed=1, response_format=City,
        messages=[{"role": "user", "content": "Give a city as JSON."}])
    city = out.choices[0].message.parsed
    assert isinstance(city, City) and isinstance(city.population, int)


def test_json_object_streams_a_json_object_per_choice(client):
    stream = chat(client, n=2, stream=True, response_format={"type": "json_object"})
    texts, reasons = ["", ""], [None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    for text, reason in zip(texts, reasons, strict=True):
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # a small model may ramble past 80 tokens inside an object
            assert reason == "length" and text.lstrip().startswith("{")


def test_truncated_json_ends_with_length(client):
    out = chat(client, max_tokens=5, response_format={"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON}})
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


def test_logprobs_are_the_models_over_the_allowed_tokens(client):
    out = chat(client, logprobs=True, top_logprobs=2, response_format={"type": "json_object"})
    choice = out.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == out.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    assert all(e.logprob <= 0 for e in entries)


def test_guided_choice_regex_and_grammar_on_completions(client):
    prompt = "Q: Is the sky blue? A:"
    options = ["yes", "no", "maybe"]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, n=4,
                                    temperature=1.0, seed=2, extra_body={"guided_choice": options})
    assert all(c.text in options and c.finish_reason == "stop" for c in out.choices)
    date = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    out = client.completions.create(model=MODEL, prompt="Today's date:", max_tokens=20, n=3,
                                    temperature=1.0, seed=4, extra_body={"guided_regex": date})
    assert all(re.fullmatch(date, c.text) for c in out.choices)
    grammar = 'start: "(" NUM (("+" | "*") NUM)* ")"\nNUM: /[1-9][0-9]?/'
    out = client.completions.create(
        model=MODEL, prompt="An arithmetic expression:", max_tokens=30, temperature=1.0,
        seed=5, extra_body={"structured_outputs": {"grammar": grammar}})
    choice = out.choices[0]
    if choice.finish_reason == "stop":
        assert re.fullmatch(r"\([1-9][0-9]?([+*][1-9][0-9]?)*\)", choice.text)
    else:
        assert re.fullmatch(r"\([1-9][0-9]?([+*][1-9][0-9]?)*[+*]?[0-9]*", choice.text)


def test_a_stop_string_cuts_a_constrained_output(client):
    out = client.completions.create(model=MODEL, prompt="Two words:", max_tokens=20,
                                    temperature=1.0, seed=6, stop=[","],
                                    extra_body={"guided_regex": "[a-z]{2,6},[a-z]{2,6}"})
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and re.fullmatch("[a-z]{2,6}", choice.text)


def test_constrained_and_free_requests_share_a_batch(client, smol_server):
    """Run together: the free one is untouched by the other's mask (same text as alone)."""
    import concurrent.futures

    def free():
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                         temperature=0, extra_body={"ignore_eos": True})

    alone = free().choices[0].text
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        constrained = [pool.submit(chat, client, response_format={"type": "json_object"})
                       for _ in range(3)]
        together = pool.submit(free)
        assert together.result().choices[0].text == alone
        for future in constrained:
            assert future.result().choices[0].message.content.lstrip().startswith("{")


def test_structured_outputs_with_the_vllm_object_on_chat(smol_server):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 80, "temperature": 0.8, "seed": 7,
            "structured_outputs": {"json": PERSON}}
    response = httpx.post(f"{smol_server.url}/v1/chat/completions", json=body,
                          headers=auth_headers(), timeout=120)
    assert response.status_code == 200
    content = response.json()["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), PERSON)
