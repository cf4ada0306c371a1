"""Helpers of the reliability tests: streamed requests read to the end, OpenAI error bodies,
a process's resident memory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.server_utils import API_KEY

ERROR_FIELDS = {"message", "type", "param", "code"}
# The reliable server refuses bodies above 1 MiB: cheap to test, far above any test request.
BODY_LIMIT = 2**20


def reliable_server_args(model: Path) -> list[str]:
    """64 slots of a 32-entry state, a key, fault injection on, access log on."""
    return [
        "--model", str(model), "--device", "cpu", "--state-size", "32", "--max-num-seqs", "64",
        "--max-queue-len", "512", "--api-key", API_KEY, "--enable-fault-injection",
        "--max-request-body-bytes", str(BODY_LIMIT),
    ]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None,
                        code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and error["message"], error
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@dataclass(slots=True)
class StreamResult:
    """What one streamed request delivered: tokens per choice (chunks that carry one),
    finish reasons, the usage chunk, an error event, and whether [DONE] came."""

    status: int
    tokens: dict[int, int] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    usage: dict | None = None
    error: dict | None = None
    done: bool = False

    def observe(self, event: dict) -> None:
        if "error" in event:
            self.error = event["error"]
            return
        if event.get("usage") and not event["choices"]:
            self.usage = event["usage"]
        for choice in event["choices"]:
            count = _token_count(choice)
            if count:
                self.tokens[choice["index"]] = self.tokens.get(choice["index"], 0) + count
            if choice.get("finish_reason"):
                self.finish[choice["index"]] = choice["finish_reason"]


def with_token_logprobs(path: str, body: dict) -> dict:
    """`body` asking for each token's log-prob, so a stream's chunks say how many tokens they
    carry: a stream that falls behind gets several tokens merged into one chunk."""
    logprobs = {"logprobs": True} if path.endswith("chat/completions") else {"logprobs": 0}
    return {**body, **logprobs}


def _token_count(choice: dict) -> int:
    logprobs = choice.get("logprobs")
    if logprobs:
        entries = logprobs.get("tokens", logprobs.get("content"))
        if entries is not None:
            return len(entries)
    return 1 if _carries_token(choice) else 0


def _carries_token(choice: dict) -> bool:
    """Completions send one chunk per token (the last with the finish reason); chat sends a
    role chunk first and a finish chunk last, both without a token."""
    if "delta" not in choice:
        return True
    delta = choice["delta"]
    return "content" in delta and "role" not in delta


def sse_events(lines: list[str]) -> list[dict | str]:
    events: list[dict | str] = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def read_stream(client: httpx.AsyncClient, path: str, body: dict,
                      headers: dict[str, str] | None = None) -> StreamResult:
    async with client.stream("POST", path, json=body, headers=headers) as response:
        result = StreamResult(response.status_code)
        if response.status_code != 200:
            await response.aread()
            result.error = response.json()["error"]
            return result
        async for line in response.aiter_lines():
            for event in sse_events([line]):
                if event == "[DONE]":
                    result.done = True
                else:
                    result.observe(event)
    return result


def rss_bytes(pid: int) -> int:
    """Resident memory of a process: psutil when installed, else /proc (Linux)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {pid}") from None
    return psutil.Process(pid).memory_info().rss
