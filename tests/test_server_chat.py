"""/v1/chat/completions against a live server, through the official OpenAI client."""

from __future__ import annotations

import httpx

from tests.server_utils import SMOL_NAMES

pytest_plugins = ("tests.server_fixtures",)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


def chat(client, messages=MESSAGES, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=SMOL_NAMES[0], messages=messages,
                                          temperature=0, **kwargs)


def template_tokens(url: str, messages) -> int:
    response = httpx.post(f"{url}/tokenize", json={"messages": messages})
    return response.json()["count"]


def test_chat_plain(client, smol_server):
    out = chat(client, extra_body={"ignore_eos": True})
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    [choice] = out.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == template_tokens(smol_server.url, MESSAGES)
    assert out.usage.completion_tokens == 8


def test_chat_stops_at_end_of_turn(client):
    out = chat(client, max_tokens=200)
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 200
    assert "<|im_end|>" not in out.choices[0].message.content


def test_chat_stream_role_then_content_then_finish(client):
    full = chat(client, extra_body={"ignore_eos": True}).choices[0].message.content
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True},
                       extra_body={"ignore_eos": True}))
    first, *content, finish, usage = chunks
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].delta.role is None for c in content)
    assert "".join(c.choices[0].delta.content for c in content) == full
    assert all(c.choices[0].finish_reason is None for c in [first, *content])
    assert finish.choices[0].finish_reason == "length" and finish.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_n_and_max_completion_tokens(client):
    out = client.chat.completions.create(
        model=SMOL_NAMES[0], messages=MESSAGES, n=3, max_completion_tokens=5, temperature=1.0,
        seed=7, extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 15


def test_chat_stream_n_choices(client):
    chunks = list(chat(client, n=2, max_tokens=3, stream=True,
                       extra_body={"ignore_eos": True}))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine][-1] == "length"
        assert sum(1 for c in mine if c.delta.content) <= 3


def test_chat_logprobs(client):
    out = chat(client, max_tokens=4, logprobs=True, top_logprobs=3,
               extra_body={"ignore_eos": True})
    entries = out.choices[0].logprobs.content
    assert len(entries) == 4
    assert "".join(e.token for e in entries) == out.choices[0].message.content
    for entry in entries:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == max(tops)  # greedy picks the most likely
        assert entry.bytes == list(entry.token.encode())
    without = chat(client, max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in without.choices[0].logprobs.content)


def test_chat_stop_and_stream_logprobs(client):
    text = chat(client, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = text[2:4]
    out = chat(client, stop=stop)
    assert out.choices[0].message.content == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    chunks = list(chat(client, max_tokens=3, stream=True, logprobs=True, top_logprobs=1,
                       extra_body={"ignore_eos": True}))
    content = [c for c in chunks if c.choices[0].delta.content]
    # An entry per token; a chunk carries one token, or several if the stream fell behind.
    assert all(len(c.choices[0].logprobs.content) >= 1 for c in content)
    assert sum(len(c.choices[0].logprobs.content) for c in content) == 3


def test_chat_content_parts_and_developer_role(client, smol_server):
    parts = [
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Name a"},
                                     {"type": "text", "text": "colour."}]},
    ]
    joined = [MESSAGES[0], {"role": "user", "content": "Name a\ncolour."}]
    out = chat(client, messages=parts)
    assert out.usage.prompt_tokens == template_tokens(smol_server.url, joined)
    reference = chat(client, messages=joined).choices[0].message.content
    assert out.choices[0].message.content == reference


def test_chat_extras_state_size_and_return_state(client):
    out = chat(client, max_tokens=3,
               extra_body={"state_size": 16, "return_state": True, "ignore_eos": True,
                           "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1})
    positions = out.choices[0].model_extra["state_positions"]
    assert len(positions) == 30 and all(len(layer) == 16 for layer in positions)


def test_continue_final_message(client, smol_server):
    messages = [*MESSAGES, {"role": "assistant", "content": "My favourite colour is"}]
    out = chat(client, messages=messages, max_tokens=2,
               extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert out.usage.prompt_tokens == httpx.post(
        f"{smol_server.url}/tokenize",
        json={"messages": messages, "add_generation_prompt": False,
              "continue_final_message": True},
    ).json()["count"]
