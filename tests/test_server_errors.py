"""Every error in OpenAI's shape and with the right status: 400 naming the parameter (never
FastAPI's 422), 401, 404, 429 with Retry-After."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from tests.server_utils import API_KEY, SMOL_NAMES, auth_headers, scrape, wait_for_metric

pytest_plugins = ("tests.server_fixtures",)

MESSAGES = [{"role": "user", "content": "Hi"}]

# (endpoint, request fields, the param the error must name)
BAD_REQUESTS = [
    ("completions", {"temperature": -1}, "temperature"),
    ("completions", {"temperature": -1, "stream": True}, "temperature"),  # 400, not a stream
    ("completions", {"top_p": 1.5}, "top_p"),
    ("completions", {"n": 0}, "n"),
    ("completions", {"n": 9}, "n"),  # more choices than the server has slots
    ("completions", {"max_tokens": -1}, "max_tokens"),
    ("completions", {"max_tokens": 9000}, "max_tokens"),  # past the model's length limit
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"presence_penalty": 3}, "presence_penalty"),
    ("completions", {"temperature": "hot"}, "temperature"),
    ("completions", {"stop": ["", "x"]}, "stop"),
    ("completions", {"prompt": [1, "a"]}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": [10**9]}, "prompt"),
    ("completions", {"suffix": "x"}, "suffix"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"logit_bias": {"99999999": 5}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": 500}}, "logit_bias"),
    ("completions", {"state_size": 129}, "state_size"),
    ("completions", {"min_tokens": 20}, "min_tokens"),  # more than max_tokens (16)
    ("completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ("completions", {"top_k": -2}, "top_k"),
    ("completions", {"protect_recent": -1}, "protect_recent"),
    ("completions", {"protect_recent": 2.5}, "protect_recent"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": 3}}}}}]},
     "tools.0.function.parameters"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}, "response_format.json_schema.schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "no spaces", "schema": {}}}}, "response_format.json_schema.name"),
    ("completions", {"guided_regex": "(("}, "guided_regex"),
    ("completions", {"guided_json": {"type": 5}}, "guided_json"),
    ("completions", {"guided_json": "{not json"}, "guided_json"),
    ("completions", {"guided_choice": []}, "guided_choice"),
    ("completions", {"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ("completions", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("completions", {"structured_outputs": {"regex": "(("}}, "structured_outputs.regex"),
    ("completions", {"structured_outputs": {}}, "structured_outputs"),
    ("completions", {"structured_outputs": {"xml": "<a/>"}}, "structured_outputs.xml"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ("chat", {"max_completion_tokens": -3}, "max_completion_tokens"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("chat", {"messages": [{"role": "system", "content": None},
                           {"role": "user", "content": "x"}]}, "messages.0.content"),
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ("chat", {"messages": [{"role": "critic", "content": "x"}]}, "messages.0.role"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
    ("chat", {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "messages.0.tool_calls"),
    ("chat", {"audio": {"voice": "alloy"}}, "audio"),
]


def post(url: str, endpoint: str, fields: dict, headers=None) -> httpx.Response:
    path = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}[endpoint]
    body = {"model": SMOL_NAMES[0], "max_tokens": 16}
    body.update({"prompt": "Hi"} if endpoint == "completions" else {"messages": MESSAGES})
    body.update(fields)
    return httpx.post(url + path, json=body, headers=headers or auth_headers(), timeout=60)


def assert_openai_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    return error


@pytest.mark.parametrize(("endpoint", "fields", "param"), BAD_REQUESTS,
                         ids=[f"{e}-{p}-{i}" for i, (e, _, p) in enumerate(BAD_REQUESTS)])
def test_bad_request_names_the_param(smol_server, endpoint, fields, param):
    error = assert_openai_error(post(smol_server.url, endpoint, fields), 400, param)
    assert error["type"] == "invalid_request_error"
    assert param.split(".")[-1] in error["message"] or param.startswith("messages")


def test_bad_requests_leave_nothing_running(smol_server):
    metrics = scrape(smol_server.url)
    assert metrics.value("tova_state_slots_used") == 0
    assert metrics.value("tova_requests_waiting") == 0


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SMOL_NAMES[0], prompt="Hi", temperature=-1)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SMOL_NAMES[0], prompt="Hi", suffix="!")
    assert info.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=SMOL_NAMES[0], messages=MESSAGES,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            tool_choice={"type": "function", "function": {"name": "g"}})
    assert info.value.body["param"] == "tool_choice"


def test_invalid_json_and_missing_fields_are_400(smol_server):
    response = httpx.post(f"{smol_server.url}/v1/completions", content=b"{not json",
                          headers={**auth_headers(), "content-type": "application/json"})
    assert_openai_error(response, 400, None)
    response = httpx.post(f"{smol_server.url}/v1/completions", json={"model": "smol"},
                          headers=auth_headers())
    assert_openai_error(response, 400, "prompt")


def test_unknown_model_is_404(client, smol_server):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-17", prompt="Hi", max_tokens=1)
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
    response = httpx.get(f"{smol_server.url}/v1/models/gpt-17", headers=auth_headers())
    assert_openai_error(response, 404, "model")


def test_unknown_route_is_404_in_openai_shape(smol_server):
    response = httpx.get(f"{smol_server.url}/v2/nothing")
    assert_openai_error(response, 404, None)


def test_api_key_required_on_v1(smol_server):
    wrong = openai.OpenAI(base_url=f"{smol_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.completions.create(model=SMOL_NAMES[0], prompt="Hi", max_tokens=1)
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions"):
        response = httpx.request("GET" if path == "/v1/models" else "POST",
                                 smol_server.url + path, json={})
        assert_openai_error(response, 401, None)
    response = httpx.get(f"{smol_server.url}/v1/models",
                         headers={"Authorization": f"Bearer {API_KEY}x"})
    assert response.status_code == 401
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(smol_server.url + path).status_code == 200
    counted = scrape(smol_server.url).value("tova_http_requests_total", route="/v1/completions",
                                            status="401")
    assert counted >= 2


# ----- the tiny server: one slot, a queue of one, no tokenizer ---------------------------

LONG = {"prompt": [5, 6, 7], "max_tokens": 3000, "ignore_eos": True, "stream": True}


class Streamer:
    """A streaming request on its own thread, so a test can hold it open."""

    def __init__(self, url: str) -> None:
        self.first_chunk = threading.Event()
        self.stop = threading.Event()
        self.status: int | None = None
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=LONG, timeout=60) as response:
            self.status = response.status_code
            for _ in response.iter_lines():
                self.first_chunk.set()
                if self.stop.is_set():
                    return  # leaving the block closes the connection mid-stream

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=30)


def test_queue_full_is_429_with_retry_after(tiny_server):
    url = tiny_server.url
    running = Streamer(url)
    assert running.first_chunk.wait(30)  # holds the only slot
    queued = Streamer(url)  # waits for the slot: the queue (of one) is now full
    assert wait_for_metric(url, "tova_requests_waiting", 1) == 1
    try:
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": [5], "max_tokens": 1})
        error = assert_openai_error(refused, 429, None)
        assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
        assert refused.headers["retry-after"] == "1"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny-llama", prompt=[5], max_tokens=1)
    finally:
        running.close()
        queued.close()
    assert running.status == 200
    # Both were aborted by their clients: the slot and the queue are free again.
    assert wait_for_metric(url, "tova_state_slots_used", 0) == 0
    assert wait_for_metric(url, "tova_requests_waiting", 0) == 0
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": [5], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_no_tokenizer_needs_token_ids(tiny_server):
    url = tiny_server.url
    text = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 1})
    assert_openai_error(text, 400, "prompt")
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES})
    assert_openai_error(chat, 400, "messages")
    tokenize = httpx.post(f"{url}/tokenize", json={"prompt": "hello"})
    assert_openai_error(tokenize, 400, "prompt")
    # Without a tokenizer, logprobs name tokens by id and the text stays empty.
    out = httpx.post(f"{url}/v1/completions",
                     json={"prompt": [5, 6], "max_tokens": 2, "logprobs": 1}).json()
    assert out["choices"][0]["logprobs"]["tokens"][0].startswith("token_id:")
    assert json.dumps(out)  # finite numbers only: JSON has no -Infinity
