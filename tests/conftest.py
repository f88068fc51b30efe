"""Shared fixtures: real brokers on 127.0.0.1 with real SQLite files, real clients.

``broker`` runs in the test's event loop (cheap, lets tests look at its core);
``broker_proc`` runs ``zchat broker`` as a subprocess (for CLI tests and for killing
and restarting). Both pick free ports; neither uses fixed sleeps.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from zchat import keys
from zchat.broker import Broker
from zchat.client import Client
from zchat.core import Limits
from zchat.guard import GuardConfig
from zchat.storage.sqlite import SqliteStorage

HEARTBEAT = 0.5  # seconds; presence timeout is 3x
# Every test client comes from 127.0.0.1: brokers of tests that are not about the edge
# take any number of names and connections from it (tests/integration/test_guard_*.py
# start theirs with the edge's own settings).
TEST_EDGE = GuardConfig(max_per_address=100_000, claims_per_minute=0)
TEST_EDGE_FLAGS = ("--max-per-address", "100000", "--claims-per-minute", "0")


def free_port_base(count: int = 4) -> int:
    """A port P with P..P+count-1 free on 127.0.0.1 right now.

    Taken below the kernel's ephemeral range, so that a broker restarted on the same
    ports does not find one of them taken by some client's outgoing connection.
    """
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 32000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM a process this test started, then SIGKILL it if it is not gone in ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """``wait_for`` for synchronous tests (subprocess peers): poll until true or fail."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)  # poll interval


async def collect(
    client: Client, count: int, timeout: float = 10.0, kinds: tuple[type, ...] | None = None,
    where: Callable[[object], bool] | None = None,
) -> list:
    """The next ``count`` events of ``client`` that are instances of ``kinds`` (default
    Msg) and satisfy ``where``."""
    from zchat import protocol as p

    kinds = kinds or (p.Msg,)
    got: list = []

    async def read() -> None:
        async for event in client.events():
            if isinstance(event, kinds) and (where is None or where(event)):
                got.append(event)
                if len(got) >= count:
                    return

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"got {len(got)} of {count} events within {timeout}s: {got}") from None
    return got


def is_chat(event: object) -> bool:
    """A text or /me message (not a join/part line)."""
    from zchat import protocol as p

    return isinstance(event, p.Msg) and event.kind in ("text", "me")


async def chat(client: Client, count: int, timeout: float = 10.0) -> list:
    """The next ``count`` chat lines (text or /me) ``client`` receives."""
    return await collect(client, count, timeout, where=is_chat)


class RunningBroker:
    def __init__(
        self, path: Path, limits: Limits, bind: str | None = None, storage: Callable[[], object] | None = None,
        secure: bool = False, **security: object,
    ) -> None:
        # secure=False: the broker's test-only plaintext mode (raw PLAIN peers of older
        # tests talk to it); tests/integration/test_curve.py runs CURVE brokers.
        self.secure = secure
        self.security = security
        self.path = path
        self.limits = limits
        self.bind = bind or f"tcp://127.0.0.1:{free_port_base()}"
        self.storage = storage or (lambda: SqliteStorage(self.path))
        self.broker: Broker | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> "RunningBroker":
        self.broker = Broker(  # type: ignore[arg-type]
            self.bind, self.storage(), self.limits, guard=self.security.pop("guard", TEST_EDGE),  # type: ignore[arg-type]
            insecure_plaintext=not self.secure, **self.security,  # type: ignore[arg-type]
        )
        self.security.setdefault("guard", self.broker.guard_config)
        await self.broker.start()
        self.bind = self.broker.endpoint  # restarts reuse the same ports
        self.task = asyncio.create_task(self.broker.run())
        return self

    @property
    def endpoint(self) -> str:
        assert self.broker is not None
        return self.broker.endpoint

    @property
    def core(self):  # type: ignore[no-untyped-def]
        assert self.broker is not None and self.broker.core is not None
        return self.broker.core

    async def stop(self) -> None:
        if self.broker is not None and self.task is not None:
            self.broker.stop()
            await asyncio.wait_for(self.task, 10)
            self.task = None


@pytest.fixture(autouse=True)
def _plaintext_declarations_end_with_the_test() -> Iterator[None]:
    """A plaintext declaration (keys.declare_insecure) a test left behind would make a
    later test's clients speak PLAIN to a CURVE broker that got the same port."""
    before, env = set(keys.INSECURE_ENDPOINTS), os.environ.get(keys.INSECURE_ENV)
    yield
    keys.INSECURE_ENDPOINTS.clear()
    keys.INSECURE_ENDPOINTS.update(before)
    if env is None:
        os.environ.pop(keys.INSECURE_ENV, None)
    else:
        os.environ[keys.INSECURE_ENV] = env


@pytest.fixture(autouse=True)
def _private_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process clients pin brokers' keys (known_brokers) and keep secrets in
    CONFIG_DIR: never in the real user's."""
    monkeypatch.setenv("ZCHAT_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[RunningBroker]:
    running = await RunningBroker(tmp_path / "history.db", Limits(heartbeat=HEARTBEAT, rate=0)).start()
    yield running
    await running.stop()


@pytest.fixture
async def connect(broker: RunningBroker) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """``await connect("alice")``: a connected client of ``broker``, closed after the test."""
    clients: list[Client] = []

    async def make(name: str, secret: str | None = None, **kwargs) -> Client:  # type: ignore[no-untyped-def]
        client = Client(broker.endpoint, name, secret or f"secret-of-{name}-0123456789", **kwargs)
        await client.connect()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: private config and data directories."""
    env = dict(os.environ)
    env["ZCHAT_CONFIG_DIR"] = str(tmp_path / "config")
    env["ZCHAT_DATA_DIR"] = str(tmp_path / "data")
    for key in list(env):
        if key.startswith("ZCHAT_") and key not in ("ZCHAT_CONFIG_DIR", "ZCHAT_DATA_DIR"):
            del env[key]
    return env


class BrokerProcess:
    def __init__(self, db: Path, env: dict[str, str], *extra: str) -> None:
        self.db = db
        self.env = env
        self.extra = extra
        self.port = free_port_base()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "BrokerProcess":
        keys.undeclare_insecure(self.endpoint)  # CURVE here now, whatever a test relay declared on this port before
        cmd = [sys.executable, "-m", "zchat", "broker", "--bind", self.endpoint, "--db", str(self.db), *TEST_EDGE_FLAGS, *self.extra]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60  # a hung start only: one that fails ends the wait at once; 3-11 s at load 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited: {self.proc.stdout.read() if self.proc.stdout else ''}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port + 2)) == 0:
                    return self
            time.sleep(0.02)  # polling interval, not a wait for an event
        raise RuntimeError("broker did not start listening within 60s")

    def stop(self, sig: int = 15) -> str:
        """Signal the broker (SIGTERM by default) and return its output."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""


@pytest.fixture
def broker_proc(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(tmp_path / "proc-history.db", cli_env, "--heartbeat", str(HEARTBEAT)).start()
    yield proc
    proc.stop()
