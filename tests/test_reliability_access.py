"""Access: the API key on /v1/* (constant-time check, 401 otherwise), /health and /metrics
open unless --protect-metrics; logs with request ids and timings but no prompt text unless
--log-requests; models load without running code from their folder."""

from __future__ import annotations

import hmac
import json
import logging
import pickle
import re

import httpx
import pytest

from server import ServerSettings, create_app
from server.cli import main
from server.http.request_log import MAX_LOGGED_BODY_CHARS
from tests.server_utils import API_KEY, auth_headers, call
from tests.tiny_chat_model import save_tiny_chat_model
from tova_engine import AsyncEngine, EngineConfig
from tova_engine.loader import load_source

pytest_plugins = ("tests.reliability_fixtures",)

SECRET = "zebra-quartz-7781"  # a prompt no log may repeat


@pytest.fixture(scope="module")
def engine(tiny_chat_model):
    engine = AsyncEngine(EngineConfig(model=str(tiny_chat_model), device="cpu", state_size=16,
                                      max_num_seqs=2))
    yield engine
    engine.shutdown()


# ----- the key ------------------------------------------------------------------------------


def test_protect_metrics_puts_metrics_behind_the_key(engine):
    app = create_app(engine, ServerSettings(api_key=API_KEY, protect_metrics=True))
    refused = call(app, "GET", "/metrics")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert call(app, "GET", "/metrics", headers=auth_headers()).status_code == 200
    # /health stays open for probes: it tells nothing but up or down.
    assert call(app, "GET", "/health").status_code == 200
    assert call(app, "GET", "/v1/models").status_code == 401


def test_metrics_open_without_protect_metrics(engine):
    app = create_app(engine, ServerSettings(api_key=API_KEY))
    assert call(app, "GET", "/metrics").status_code == 200
    assert call(app, "GET", "/health").status_code == 200


@pytest.mark.parametrize(("header", "status"), [
    (f"Bearer {API_KEY}", 200),
    (f"bearer {API_KEY}", 200),  # the scheme is case-insensitive (RFC 9110)
    (f"Bearer  {API_KEY} ", 200),
    (f"Bearer {API_KEY}x", 401),
    (f"Bearer {API_KEY[:-1]}", 401),
    ("Bearer", 401),
    (f"Basic {API_KEY}", 401),
    (API_KEY, 401),
    ("", 401),
])
def test_key_check(engine, header, status):
    app = create_app(engine, ServerSettings(api_key=API_KEY))
    assert call(app, "GET", "/v1/models", headers={"Authorization": header}).status_code == status


def test_key_is_compared_in_constant_time(engine, monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr("server.http.auth.hmac.compare_digest", spy)
    app = create_app(engine, ServerSettings(api_key=API_KEY))
    for guess in ("x", "a much longer guess than the key itself", API_KEY):
        call(app, "GET", "/v1/models", headers={"Authorization": f"Bearer {guess}"})
    # Digests of equal length whatever the guess: neither content nor length leaks.
    assert len(compared) == 3 and {len(a) for pair in compared for a in pair} == {32}


def test_protect_metrics_needs_a_key(capsys):
    with pytest.raises(ValueError, match="protect_metrics"):
        ServerSettings(protect_metrics=True)
    with pytest.raises(SystemExit) as info:
        main(["--protect-metrics"])
    assert info.value.code == 2 and "protect_metrics" in capsys.readouterr().err


# ----- logs ---------------------------------------------------------------------------------


def access_lines(text: str, request_id: str) -> list[str]:
    return [line for line in text.splitlines() if f"request_id={request_id} " in line]


def test_log_has_request_id_and_timings_not_the_prompt(reliable_server):
    url = reliable_server.url
    completion = httpx.post(f"{url}/v1/completions", headers=auth_headers(), timeout=60,
                            json={"prompt": SECRET, "max_tokens": 3, "ignore_eos": True})
    chat = httpx.post(f"{url}/v1/chat/completions", headers=auth_headers(), timeout=60,
                      json={"messages": [{"role": "user", "content": SECRET}], "max_tokens": 2,
                            "stream": True})
    refused = httpx.post(f"{url}/v1/completions", headers=auth_headers(),
                         json={"prompt": SECRET, "temperature": -1})
    request_id = completion.json()["id"]
    assert completion.headers["x-request-id"] == request_id
    assert chat.headers["x-request-id"].startswith("chatcmpl-")
    log = reliable_server.log_path.read_text()
    [line] = access_lines(log, request_id)
    fields = dict(part.split("=", 1) for part in line.split(": ", 1)[1].split())
    assert fields["method"] == "POST" and fields["path"] == "/v1/completions"
    assert fields["status"] == "200" and fields["finish"] == "length"
    assert fields["completion_tokens"] == "3"
    assert fields["prompt_tokens"] == str(completion.json()["usage"]["prompt_tokens"])
    for timing in ("duration_ms", "queue_ms", "ttft_ms"):
        assert float(fields[timing]) >= 0
    assert len(access_lines(log, chat.headers["x-request-id"])) == 1
    assert len(access_lines(log, refused.headers["x-request-id"])) == 1
    assert SECRET not in log


def test_log_requests_logs_the_body(engine, caplog):
    app = create_app(engine, ServerSettings(log_requests=True))
    with caplog.at_level(logging.INFO, logger="server.access"):
        response = call(app, "POST", "/v1/completions", json={"prompt": SECRET, "max_tokens": 1})
    request_id = response.json()["id"]
    [body_line] = [r.getMessage() for r in caplog.records if "body=" in r.getMessage()]
    assert body_line.startswith(f"request_id={request_id} body=")
    assert json.loads(body_line.split("body=", 1)[1])["prompt"] == [SECRET]


def test_logged_bodies_are_cut(engine, caplog):
    app = create_app(engine, ServerSettings(log_requests=True))
    with caplog.at_level(logging.INFO, logger="server.access"):
        call(app, "POST", "/v1/completions", json={"prompt": "y" * 50000, "max_tokens": 1})
    [body_line] = [r.getMessage() for r in caplog.records if "body=" in r.getMessage()]
    assert len(body_line) < MAX_LOGGED_BODY_CHARS + 200 and body_line.endswith("more chars)")


def test_no_prompt_in_the_log_by_default_and_paths_cannot_forge_lines(engine, caplog):
    app = create_app(engine)
    with caplog.at_level(logging.INFO, logger="server.access"):
        call(app, "POST", "/v1/completions", json={"prompt": SECRET, "max_tokens": 1})
        call(app, "GET", "/v1/nothing%0Arequest_id=forged")
    messages = [r.getMessage() for r in caplog.records]
    assert messages and not any(SECRET in m for m in messages)
    assert all("\n" not in m for m in messages)
    assert any('path="/v1/nothing\\nrequest_id=forged"' in m for m in messages)


# ----- no code from the model folder --------------------------------------------------------


def booby_trapped_model(folder, marker):
    """A model folder whose config and tokenizer point at its own Python code, with a pickle
    that runs code when unpickled: loading must run none of it."""
    save_tiny_chat_model(folder)
    (folder / "evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('code from the model folder ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    for name, auto_map in (
        ("config.json", {"AutoConfig": "evil.EvilConfig",
                         "AutoModelForCausalLM": "evil.EvilModel"}),
        ("tokenizer_config.json", {"AutoTokenizer": [None, "evil.EvilTokenizer"]}),
    ):
        settings = json.loads((folder / name).read_text())
        settings["auto_map"] = auto_map
        (folder / name).write_text(json.dumps(settings))

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('a pickle ran')",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    return folder


def test_model_folders_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    folder = booby_trapped_model(tmp_path / "model", marker)
    source = load_source(str(folder))
    assert sum(1 for _ in source.weights) > 0 and source.tokenizer is not None
    assert not marker.exists()
    # Naming the custom class outright makes the tokenizer refuse, still without running it.
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "EvilTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=re.escape("trust_remote_code")):
        load_source(str(folder))
    assert not marker.exists()
