"""Hand-written bad input, beyond tests/test_server_errors.py: malformed and non-JSON bodies,
non-UTF-8 bytes and lone surrogates, wrong types, huge and negative numbers, empty strings,
token ids out of range, prompts past the model's positions, unknown fields (ignored, as
vLLM does; refused under --strict-request-fields: tests/test_request_fields.py) and bodies over
the size limit (413).
Every refusal is a 4xx in OpenAI's shape naming the parameter; nothing is a 5xx."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

from server.http.body_limit import BodyLimitMiddleware
from tests.reliability_utils import BODY_LIMIT, assert_openai_error
from tests.server_utils import auth_headers

pytest_plugins = ("tests.reliability_fixtures",)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
# The reliable server's model: 261 tokens (bytes and specials), 4096 positions.
VOCAB = 261
POSITIONS = 4096
NOT_AN_OBJECT = "the request body must be a JSON object"


def post_raw(url: str, path: str, content: bytes,
             content_type: str | None = "application/json") -> httpx.Response:
    headers = auth_headers()
    if content_type is not None:
        headers["content-type"] = content_type
    return httpx.post(url + path, content=content, headers=headers, timeout=60)


def post(url: str, path: str, body: dict) -> httpx.Response:
    base = {"prompt": "Hi"} if path == COMPLETIONS else {"messages": MESSAGES}
    return httpx.post(url + path, json={**base, "max_tokens": 2, **body},
                      headers=auth_headers(), timeout=60)


# ----- bodies that are not a JSON object, or not text --------------------------------------

RAW = [
    # (body, content type, the error message's start)
    (b'{"prompt": "Hi",', "application/json", "the request body is not valid JSON"),
    (b"[1, 2]", "application/json", NOT_AN_OBJECT),
    (b'"Hi"', "application/json", NOT_AN_OBJECT),
    (b"null", "application/json", NOT_AN_OBJECT),
    (b"", "application/json", NOT_AN_OBJECT),
    (b'{"prompt": "Hi"}', "text/plain", NOT_AN_OBJECT),
    (b'{"prompt": "Hi"}', None, NOT_AN_OBJECT),
    (b"prompt=Hi", "application/x-www-form-urlencoded", NOT_AN_OBJECT),
    # Bytes that are not UTF-8.
    (b'{"prompt": "\xff\xfe"}', "application/json", "There was an error parsing the body"),
]


@pytest.mark.parametrize(("content", "content_type", "message"), RAW,
                         ids=[f"raw-{i}" for i in range(len(RAW))])
def test_body_that_is_not_a_json_object_is_400(reliable_server, content, content_type, message):
    response = post_raw(reliable_server.url, COMPLETIONS, content, content_type)
    error = assert_openai_error(response, 400)
    assert error["message"].startswith(message) and error["type"] == "invalid_request_error"


# JSON may escape a lone UTF-16 surrogate; no tokenizer (and no JSON encoder) takes it.
SURROGATES = [
    (COMPLETIONS, b'{"prompt": "a\\ud800b"}', "prompt"),
    (COMPLETIONS, b'{"prompt": ["ok", "\\udfff"]}', "prompt.1"),
    (COMPLETIONS, b'{"prompt": "Hi", "stop": ["\\ud800"]}', "stop.0"),
    (COMPLETIONS, b'{"prompt": "Hi", "model": "\\ud800"}', "model"),
    (COMPLETIONS, b'{"prompt": "Hi", "\\ud800": 1}', "\\ud800"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
]


@pytest.mark.parametrize(("path", "content", "param"), SURROGATES,
                         ids=[p for _, _, p in SURROGATES])
def test_lone_surrogates_are_400_naming_the_field(reliable_server, path, content, param):
    error = assert_openai_error(post_raw(reliable_server.url, path, content), 400, param)
    assert "valid Unicode" in error["message"]


# ----- values: wrong types, huge, negative, empty, out of range ----------------------------


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"NaN", b"Infinity"])
def test_non_finite_numbers_are_400(reliable_server, number):
    """JSON has no infinities, but Python's parser reads 1e400 as one (and NaN as NaN)."""
    content = b'{"prompt": "Hi", "temperature": ' + number + b"}"
    error = assert_openai_error(post_raw(reliable_server.url, COMPLETIONS, content), 400,
                                "temperature")
    assert "finite" in error["message"]


# (path, fields, the param the 400 names)
BAD_VALUES = [
    # wrong types
    (COMPLETIONS, {"n": "two"}, "n"),
    (COMPLETIONS, {"max_tokens": "ten"}, "max_tokens"),
    (COMPLETIONS, {"max_tokens": 1.5}, "max_tokens"),
    (COMPLETIONS, {"prompt": {"text": "Hi"}}, "prompt"),
    (COMPLETIONS, {"stop": 5}, "stop"),
    (COMPLETIONS, {"logit_bias": [1]}, "logit_bias"),
    (COMPLETIONS, {"echo": [True]}, "echo"),
    (CHAT, {"messages": "Hi"}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    (CHAT, {"logprobs": "some"}, "logprobs"),
    # huge
    (COMPLETIONS, {"n": 10**12}, "n"),
    (COMPLETIONS, {"n": 2**64}, "n"),
    (COMPLETIONS, {"max_tokens": 10**30}, "max_tokens"),
    (COMPLETIONS, {"logprobs": 10**6}, "logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": 10**6}, "top_logprobs"),
    (CHAT, {"max_completion_tokens": 10**18}, "max_completion_tokens"),
    (COMPLETIONS, {"repetition_penalty": 1e-300}, "repetition_penalty"),
    # negative
    (COMPLETIONS, {"n": -1}, "n"),
    (COMPLETIONS, {"logprobs": -1}, "logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    (COMPLETIONS, {"min_tokens": -1}, "min_tokens"),
    (COMPLETIONS, {"state_size": -1}, "state_size"),
    (COMPLETIONS, {"repetition_penalty": -1}, "repetition_penalty"),
    (COMPLETIONS, {"logit_bias": {"-1": 1}}, "logit_bias"),
    (COMPLETIONS, {"prompt": [-1]}, "prompt"),
    # empty
    (COMPLETIONS, {"prompt": [""]}, "prompt"),
    (COMPLETIONS, {"prompt": ["Hi", ""]}, "prompt"),
    (COMPLETIONS, {"stop": ""}, "stop"),
    # token ids out of range
    (COMPLETIONS, {"prompt": [VOCAB]}, "prompt"),
    (COMPLETIONS, {"prompt": [[5, 6], [VOCAB + 7]]}, "prompt"),
    (COMPLETIONS, {"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
    # beyond the model's positions
    (COMPLETIONS, {"prompt": [5] * POSITIONS}, "prompt"),
    (COMPLETIONS, {"prompt": "x" * (POSITIONS + 10)}, "prompt"),
    (COMPLETIONS, {"prompt": [5] * (POSITIONS - 10), "max_tokens": 20}, "max_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * POSITIONS}]}, "messages"),
    # OpenAI's fields that are accepted and ignored still have their types checked
    (CHAT, {"store": "maybe"}, "store"),
    (CHAT, {"metadata": {"k": 1}}, "metadata.k"),
    (CHAT, {"service_tier": "fastest"}, "service_tier"),
]


@pytest.mark.parametrize(("path", "fields", "param"), BAD_VALUES,
                         ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD_VALUES)])
def test_bad_values_are_400_naming_the_param(reliable_server, path, fields, param):
    error = assert_openai_error(post(reliable_server.url, path, fields), 400, param)
    assert error["type"] == "invalid_request_error"


def test_detokenize_out_of_range_is_400(reliable_server):
    response = httpx.post(f"{reliable_server.url}/detokenize", json={"tokens": [VOCAB]})
    assert_openai_error(response, 400, "tokens")


# Accepted: what pydantic's lax mode coerces, fields OpenAI's API takes that change nothing
# here, values that are extreme but harmless, empty content where OpenAI takes it.
ACCEPTED = [
    (COMPLETIONS, {"n": "2"}, 2),  # a numeric string is a number
    (COMPLETIONS, {"max_tokens": 2.0}, 1),  # an integral float is an integer
    (COMPLETIONS, {"prompt": [5.0, 6.0]}, 1),  # ... token ids too, as JSON Schema has it
    (COMPLETIONS, {"user": "user-1234"}, 1),  # ignored, as it is for OpenAI's abuse checks
    (CHAT, {"store": True, "metadata": {"k": "v"}}, 1),  # OpenAI's: accepted and ignored
    (COMPLETIONS, {"frobnicate": 1}, 1),  # nobody's: ignored with a warning (vLLM's way)
    (CHAT, {"messages": [{"role": "user", "content": "Hi", "x": 1}]}, 1),  # nested too
    (CHAT, {"parallel_tool_calls": False}, 1),  # only meaningful with tools
    (CHAT, {"messages": [{"role": "user", "content": ""}]}, 1),
    (COMPLETIONS, {"seed": 2**80}, 1),  # reduced to 64 bits
    (COMPLETIONS, {"temperature": 1e308}, 1),  # uniform sampling
    (COMPLETIONS, {"top_k": 10**12}, 1),  # more than the vocabulary: off
    (COMPLETIONS, {"stop_token_ids": [10**9]}, 1),  # can never match
    (COMPLETIONS, {"prompt": [VOCAB - 1]}, 1),  # the last id
]


@pytest.mark.parametrize(("path", "fields", "choices"), ACCEPTED,
                         ids=[f"{i}-{next(iter(f))}" for i, (_, f, _) in enumerate(ACCEPTED)])
def test_accepted_inputs(reliable_server, path, fields, choices):
    response = post(reliable_server.url, path, {"ignore_eos": True, **fields})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2 * choices


def test_duplicate_keys_take_the_last(reliable_server):
    content = b'{"prompt": "Hi", "max_tokens": 9, "max_tokens": 2, "ignore_eos": true}'
    response = post_raw(reliable_server.url, COMPLETIONS, content)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


def test_prompt_exactly_at_the_limit_with_max_tokens_0_scores_it(reliable_server):
    body = {"prompt": [5] * POSITIONS, "max_tokens": 0, "echo": True, "logprobs": 0}
    response = post(reliable_server.url, COMPLETIONS, body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    state = usage.pop("state_details")
    assert usage == {"prompt_tokens": POSITIONS, "completion_tokens": 0,
                     "total_tokens": POSITIONS, "prompt_tokens_details": {"cached_tokens": 0}}
    assert state["prompt_tokens_evicted"] == state["tokens_evicted"] == \
        POSITIONS - state["state_size"] > 0


# ----- 413: bodies over --max-request-body-bytes ------------------------------------------


def oversized_body() -> bytes:
    return b'{"prompt": "' + b"x" * BODY_LIMIT + b'"}'


def test_body_over_the_limit_is_413(reliable_server):
    response = post_raw(reliable_server.url, COMPLETIONS, oversized_body())
    error = assert_openai_error(response, 413, code="request_too_large")
    assert error["type"] == "invalid_request_error" and str(BODY_LIMIT) in error["message"]
    assert response.headers["connection"] == "close"


def test_chunked_body_over_the_limit_is_413(reliable_server):
    body = oversized_body()

    def chunks():  # an iterator: httpx sends it chunked, without a Content-Length
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    response = httpx.post(reliable_server.url + COMPLETIONS, content=chunks(),
                          headers={**auth_headers(), "content-type": "application/json"},
                          timeout=60)
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, code="request_too_large")


def test_body_just_under_the_limit_is_parsed(reliable_server):
    # A valid body one byte under the limit: refused for its prompt's length, not its size.
    head, tail = b'{"prompt": "', b'"}'
    body = head + b"x" * (BODY_LIMIT - len(head) - len(tail) - 1) + tail
    assert_openai_error(post_raw(reliable_server.url, COMPLETIONS, body), 400, "prompt")


def raw_exchange(url: str, head: bytes, body_chunks: list[bytes]) -> bytes:
    """Send a request's head and some body, never its end, and read what comes back until
    the server closes the connection. The reply is read while the body is still being sent:
    a server that answers early and closes on unread bytes resets the connection, and a
    reset that arrives before the reply was read would drop it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        parts: list[bytes] = []

        def read() -> None:
            try:
                while data := sock.recv(65536):
                    parts.append(data)
            except (ConnectionResetError, TimeoutError):
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: its answer is what counts
        reader.join(timeout=15)
        return b"".join(parts)


def request_head(extra: str) -> bytes:
    return (f"POST {COMPLETIONS} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Authorization: {auth_headers()['Authorization']}\r\n{extra}\r\n").encode()


def test_declared_length_over_the_limit_is_refused_before_the_body(reliable_server):
    started = time.monotonic()
    # 10 GB announced, not a byte sent: the answer cannot have waited for the body.
    reply = raw_exchange(reliable_server.url, request_head("Content-Length: 10000000000\r\n"),
                         [])
    assert reply.startswith(b"HTTP/1.1 413 ") and b'"request_too_large"' in reply
    assert time.monotonic() - started < 5


def test_chunked_upload_is_cut_off_at_the_limit(reliable_server):
    def framed(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    # Past the limit by one chunk, and the upload never ends (no final 0-size chunk).
    chunks = [framed(b'{"prompt": "')]
    chunks += [framed(b"x" * 65536)] * (BODY_LIMIT // 65536 + 1)
    reply = raw_exchange(reliable_server.url, request_head("Transfer-Encoding: chunked\r\n"),
                         chunks)
    assert reply.startswith(b"HTTP/1.1 413 ")


def test_server_serves_on_after_413s(reliable_server):
    response = post(reliable_server.url, COMPLETIONS, {"ignore_eos": True})
    assert response.status_code == 200


# ----- the middleware alone: a declared size is refused without a receive() --------------


def test_body_limit_never_reads_a_body_declared_too_large():
    async def app(scope, receive, send):
        raise AssertionError("the app must not run")

    async def receive():
        raise AssertionError("the body must not be read")

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(b"content-length", b"101")]}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=100)(scope, receive, send))
    assert sent[0]["status"] == 413


def test_body_limit_hands_a_body_within_it_to_the_app_once():
    messages = [{"type": "http.request", "body": b"ab", "more_body": True},
                {"type": "http.request", "body": b"cd", "more_body": False},
                {"type": "http.disconnect"}]
    seen: list[dict] = []

    async def app(scope, receive, send):
        seen.append(await receive())
        seen.append(await receive())  # then the client's own messages: the disconnect

    async def receive():
        return messages.pop(0)

    async def send(message):
        raise AssertionError("nothing to send")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=4)(scope, receive, send))
    assert seen == [{"type": "http.request", "body": b"abcd", "more_body": False},
                    {"type": "http.disconnect"}]
