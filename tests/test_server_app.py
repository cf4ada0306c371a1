"""The app in-process (no socket) around a real engine with a tiny model: a failing engine
step (the fault injection's `fail-step`), an engine that was shut down."""

from __future__ import annotations

import json

import httpx
import pytest

from server import ServerSettings, create_app
from server.http.admission import Admission
from server.http.errors import APIError
from tests.server_utils import Metrics, call
from tova_engine import AsyncEngine, EngineConfig

BODY = {"prompt": [3, 4, 5], "max_tokens": 4, "ignore_eos": True}


def make_engine(tiny_llama) -> AsyncEngine:
    return AsyncEngine(EngineConfig(model=str(tiny_llama), device="cpu", state_size=8,
                                    max_num_seqs=2))


@pytest.fixture(scope="module")
def engine(tiny_llama):
    engine = make_engine(tiny_llama)
    yield engine
    engine.shutdown()


def sse_events(response: httpx.Response) -> list:
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


FAIL_STEP = {"X-Tova-Fault": "fail-step"}


def test_engine_failure_is_500_without_traceback(engine):
    app = create_app(engine, ServerSettings(enable_fault_injection=True))
    response = call(app, "POST", "/v1/completions", json=BODY, headers=FAIL_STEP)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    assert "simulated device fault" in error["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    metrics = Metrics(call(app, "GET", "/metrics").text)
    assert metrics.value("tova_requests_total", finished_reason="error") == 1
    assert metrics.value("tova_state_slots_used") == 0


def test_engine_failure_mid_stream_is_an_error_event(engine):
    app = create_app(engine, ServerSettings(enable_fault_injection=True))
    response = call(app, "POST", "/v1/completions", json={**BODY, "stream": True},
                    headers=FAIL_STEP)
    assert response.status_code == 200  # headers went out before the step failed
    *_, error, done = sse_events(response)
    assert done == "[DONE]"
    assert error["error"]["code"] == "engine_error" and "Traceback" not in response.text


def test_engine_recovers_after_a_failed_step(engine):
    response = call(create_app(engine), "POST", "/v1/completions", json=BODY)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 4


def test_dead_engine_is_503(tiny_llama):
    engine = make_engine(tiny_llama)
    app = create_app(engine, ServerSettings(served_model_names=("tiny",)))
    assert call(app, "GET", "/health").status_code == 200
    engine.shutdown()
    health = call(app, "GET", "/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    for stream in (False, True):
        response = call(app, "POST", "/v1/completions", json={**BODY, "stream": stream})
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "server_error"


def test_served_model_names_and_no_key_by_default(engine):
    app = create_app(engine, ServerSettings(served_model_names=("a", "b")))
    assert [m["id"] for m in call(app, "GET", "/v1/models").json()["data"]] == ["a", "b"]
    response = call(app, "POST", "/v1/completions", json={**BODY, "model": "b"})
    assert response.status_code == 200 and response.json()["model"] == "b"


def test_a_failing_metrics_callback_never_stops_the_engine(engine, monkeypatch):
    app = create_app(engine)
    metrics = app.state.context.metrics

    def broken(stats):
        raise RuntimeError("metrics bug")

    monkeypatch.setattr(metrics, "_observe_step", broken)
    response = call(app, "POST", "/v1/completions", json=BODY)
    assert response.status_code == 200 and engine.is_ready


# ----- units ------------------------------------------------------------------------------


def test_admission_counts_waiting_and_refuses_when_full():
    running = [0]
    admission = Admission(lambda: running[0], max_queue_len=2, retry_after_s=3)
    first = admission.admit(1)
    running[0] = 1  # the engine took it
    assert admission.waiting() == 0
    second = admission.admit(2)  # a batch of two prompts
    assert admission.waiting() == 2
    with pytest.raises(APIError) as info:
        admission.admit(1)
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "3"}
    second.release()
    second.release_all()
    second.release_all()  # places are given back once, however often it is called
    assert admission.submitted == 1 and admission.waiting() == 0
    first.release_all()
    assert admission.submitted == 0


def test_unbounded_queue_never_refuses():
    admission = Admission(lambda: 0, max_queue_len=None)
    for _ in range(100):
        admission.admit(1)
    assert admission.waiting() == 100


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_queue_len": 0}, "max_queue_len"),
    ({"api_key": ""}, "api_key"),
    ({"served_model_names": ("",)}, "served model names"),
    ({"protect_metrics": True}, "protect_metrics"),
    ({"max_request_body_bytes": 0}, "max_request_body_bytes"),
    ({"max_request_body_bytes": True}, "max_request_body_bytes"),
    ({"shutdown_timeout_s": -1.0}, "shutdown_timeout_s"),
    ({"shutdown_timeout_s": float("inf")}, "shutdown_timeout_s"),
])
def test_settings_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ServerSettings(**kwargs)
