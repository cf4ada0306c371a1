"""Conversations across a fleet (issue 29, item 2): two tova-server replicas of a tiny chat
model behind the shipped HAProxy config (docker/haproxy/haproxy.cfg on loopback, as
`benchmarks/balancers.py` runs it), driven by the official `openai` client with
`previous_response_id`, no client retries.

- With a shared `--state-store-dir` (one directory both replicas mount): 100 conversations
  x 5 turns lose no continuation while one replica drains, stops and restarts in the middle.
  Every continuation stands on the whole conversation (cached tokens = everything before it);
  the balancer sends each to the replica that made the previous response while it is up,
  the other replica continues from the shared directory while it is down, and the restarted
  one continues from the directory what it made before; sampled conversations say what one
  replica alone says.
- Without one: the stick table still sends every continuation to the replica that made the
  response (the issue's "10 of 10 got 404" is gone), and once that replica is gone its
  conversations get a 404 that says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from benchmarks.balancers import loopback_haproxy_config
from tests.server_utils import REPO, free_port, wait_until_ok
from tests.tiny_chat_model import save_tiny_chat_model

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (.ci/run installs it)")
MODEL = "tiny-chat"
TURN = dict(model=MODEL, max_output_tokens=4, temperature=0, extra_body={"ignore_eos": True})
CONVERSATIONS, TURNS = 100, 5


class Replica:
    """`python -m server` on a fixed port, so that a restart comes back where the balancer
    looks for it."""

    def __init__(self, model: Path, folder: Path, name: str, state_dir: Path | None) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            "--model", str(model), "--device", "cpu", "--dtype", "float32",
            "--state-size", "16", "--max-num-seqs", "8", "--prefill-chunk-size", "8",
            "--served-model-name", MODEL, "--disable-access-log", "--shutdown-timeout", "30",
            *(["--state-store-dir", str(state_dir)] if state_dir is not None else []),
        ]
        self.folder = folder
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Replica:
        self.starts += 1
        log = open(self.folder / f"{self.name}-{self.starts}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(self.port), *self.args],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own descriptor
        return self

    def wait_ready(self) -> Replica:
        wait_until_ok(self.process, f"{self.url}/ready", 240, 0.1,
                      lambda why: f"{self.name} {why}")
        return self

    def stop(self) -> int:
        """SIGTERM: the graceful drain; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def in_rotation() -> None:
    """A replica that answers /ready is in HAProxy's rotation after two checks ("rise 2",
    "inter 1s")."""
    time.sleep(2.5)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("fleet-model"))


@contextlib.contextmanager
def fleet(chat_model: Path, folder: Path, shared: Path | None) -> Iterator[tuple[str, list]]:
    """Two replicas (sharing `shared` as their state directory, or with none) and the
    balancer in front: (the balancer's url, the replicas)."""
    replicas = [Replica(chat_model, folder, f"r{i}", shared).start() for i in range(2)]
    port = free_port()
    config = folder / "haproxy.cfg"
    config.write_text(loopback_haproxy_config(port, [r.port for r in replicas], log="stderr"))
    log = open(folder / "haproxy.log", "w")  # noqa: SIM115  (closed below)
    balancer = subprocess.Popen(["haproxy", "-db", "-f", str(config)],
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        for replica in replicas:
            replica.wait_ready()
        url = f"http://127.0.0.1:{port}"
        wait_until_ok(balancer, f"{url}/ready", 30, 0.1, lambda why: f"haproxy {why}")
        in_rotation()
        yield url, replicas
    finally:
        balancer.terminate()
        balancer.wait(10)
        log.close()
        for replica in replicas:
            replica.stop()


def client_of(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                              timeout=120, http_client=httpx.AsyncClient(
                                  limits=httpx.Limits(max_connections=32), timeout=120))


class Turn:
    """One response of a conversation: what it said, where it ran, what it stood on."""

    def __init__(self, raw) -> None:
        response = raw.parse()
        self.id = response.id
        self.text = response.output_text
        self.replica = raw.headers.get("x-tova-replica")
        usage = response.usage
        self.stood_on = usage.input_tokens_details.cached_tokens
        self.total = usage.input_tokens + usage.output_tokens


class Conversations:
    """Conversations that go on turn by turn; failures are kept, not raised, and counted."""

    def __init__(self, client: openai.AsyncOpenAI, count: int) -> None:
        self.client = client
        self.turns: list[list[Turn]] = [[] for _ in range(count)]
        self.failures: list[str] = []

    async def turn(self, index: int) -> None:
        done = self.turns[index]
        previous = done[-1].id if done else None
        try:
            raw = await self.client.responses.with_raw_response.create(
                input=f"Conversation {index:03d}, turn {len(done)}.",
                previous_response_id=previous, **TURN)
        except openai.APIStatusError as exc:
            self.failures.append(f"conversation {index} turn {len(done)}: {exc}")
            return
        done.append(Turn(raw))

    async def run(self, indices, concurrency: int = 24) -> None:
        """One more turn of each conversation in `indices`."""
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> None:
            async with gate:
                await self.turn(index)

        await asyncio.gather(*(one(i) for i in indices))

    def continuations(self):
        """(previous turn, turn) of every continuation."""
        for turns in self.turns:
            yield from itertools.pairwise(turns)


def test_shared_state_dir_loses_no_continuation_across_a_drain_and_restart(
        chat_model, tmp_path):
    every = range(CONVERSATIONS)
    low, high = range(CONVERSATIONS // 2), range(CONVERSATIONS // 2, CONVERSATIONS)
    with fleet(chat_model, tmp_path, tmp_path / "states") as (url, (r0, r1)):

        async def run() -> tuple[Conversations, int]:
            talk = Conversations(client_of(url), CONVERSATIONS)
            await talk.run(every)  # turns 1 and 2 with both replicas up (the second in
            await talk.run(reversed(every))  # another order than least connections' turns)
            await talk.run(high)  # turn 3 of half
            # Turn 3 of the other half while r0 drains: its streams finish there, the
            # requests it refuses (503) go to r1.
            drained = asyncio.create_task(talk.run(low))
            await asyncio.sleep(0.2)
            r0.process.send_signal(signal.SIGTERM)
            await drained
            status = await asyncio.to_thread(r0.process.wait, 60)
            await talk.run(low)  # turn 4 of that half with r0 down: on r1 alone
            r0.start()
            await asyncio.to_thread(r0.wait_ready)
            await asyncio.to_thread(in_rotation)
            await talk.run(high)  # turn 4 of the other half: r0 back, its memory empty
            await talk.run(every)  # turn 5
            await talk.client.close()
            return talk, status

        talk, status = asyncio.run(run())
        assert not talk.failures, f"{len(talk.failures)} lost: {talk.failures[:5]}"
        assert status == 0  # the drained replica exited cleanly
        assert all(len(turns) == TURNS for turns in talk.turns)
        pairs = list(talk.continuations())
        assert len(pairs) == CONVERSATIONS * (TURNS - 1)
        # Each continuation stood on everything before it: its state was restored.
        assert all(turn.stood_on == previous.total for previous, turn in pairs)
        # Both replicas up: a continuation went where the response it continues was made.
        assert {t[0].replica for t in talk.turns} == {"r0", "r1"}
        assert all(t[1].replica == t[0].replica for t in talk.turns)
        assert all(talk.turns[i][2].replica == talk.turns[i][1].replica for i in high)
        # r0 draining or down: r1 went on with r0's conversations, from the shared directory.
        crossed = [i for i in low if any(p.replica == "r0" and t.replica == "r1"
                                         for p, t in itertools.pairwise(talk.turns[i]))]
        assert len(crossed) >= 10, len(crossed)
        # The restarted r0 (no state in its memory) went on with what it made before.
        resumed = [i for i in high if talk.turns[i][2].replica == talk.turns[i][3].replica
                   == "r0"]
        assert len(resumed) >= 10, len(resumed)
        moved = sum(p.replica != t.replica for p, t in pairs)
        print(f"\nshared directory: 0 of {len(pairs)} continuations lost; {moved} ran on "
              f"another replica than the previous turn; {len(crossed)} conversations went on "
              f"on r1 while r0 drained or was down, {len(resumed)} on r0 after its restart")
        # Sampled conversations, whichever replicas ran their turns, say what one replica
        # says alone.
        sample = sorted({low[0], crossed[0], resumed[0], high[-1]})

        async def alone() -> Conversations:
            single = Conversations(client_of(r1.url), CONVERSATIONS)
            for _ in range(TURNS):
                await single.run(sample)
            await single.client.close()
            return single

        single = asyncio.run(alone())
        for i in sample:
            assert [t.text for t in single.turns[i]] == [t.text for t in talk.turns[i]], i


def test_without_a_shared_dir_continuations_stick_and_a_lost_replica_is_a_clear_404(
        chat_model, tmp_path):
    count = 10
    with fleet(chat_model, tmp_path, None) as (url, (r0, _)):

        async def continue_lost(talk: Conversations, index: int) -> openai.APIStatusError:
            try:
                await talk.client.responses.create(
                    input="Still there?", previous_response_id=talk.turns[index][-1].id,
                    **TURN)
            except openai.APIStatusError as exc:
                return exc
            raise AssertionError(f"conversation {index} went on without its state")

        async def run() -> tuple[Conversations, list[int], list[openai.APIStatusError]]:
            talk = Conversations(client_of(url), count)
            for i in range(count):  # the run: one conversation after the other
                await talk.turn(i)
                await talk.turn(i)
            r0.stop()  # its conversations' states were in its memory only
            orphans = [i for i in range(count) if talk.turns[i][-1].replica == "r0"]
            errors = [await continue_lost(talk, i) for i in orphans]
            await talk.run([i for i in range(count) if i not in orphans])
            await talk.client.close()
            return talk, orphans, errors

        talk, orphans, errors = asyncio.run(run())
    assert not talk.failures, f"{len(talk.failures)} of {count} lost: {talk.failures[:2]}"
    # Every first continuation reached the replica that made the response (0 of 10 lost).
    assert all(turns[1].replica == turns[0].replica for turns in talk.turns)
    assert 0 < len(orphans) < count  # both replicas took conversations
    # r0 gone: its conversations end with a 404 that says why; r1's go on.
    for error in errors:
        assert error.status_code == 404
        assert error.body["code"] == "not_found"
        assert error.body["param"] == "previous_response_id"
        message = error.body["message"]
        assert "this server keeps them in memory (no --state-store-dir)" in message
        assert "every replica mounts one shared directory as --state-store-dir" in message
        assert "docs/reliability.md#conversations-across-replicas" in message
    assert all(len(talk.turns[i]) == 3 for i in range(count) if i not in orphans)
    print(f"\nno shared directory: 0 of {count} first continuations lost; with r0 gone, "
          f"{len(errors)} of {len(orphans)} of its conversations got the 404")
