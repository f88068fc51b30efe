"""IRC test helpers: an in-process gateway on a fixture broker, a raw IRC peer over
a plain socket, and the ``zchat irc`` subprocess for the real-client tests."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, RunningBroker
from zchat.irc.lines import Line, format_line, parse
from zchat.irc.server import Gateway
from zchat.irc.signin import Gatekeeper


class Peer:
    """A raw IRC client: writes lines, keeps every parsed line it got in ``lines``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.lines: list[Line] = []
        self.raw: list[bytes] = []
        self.closed = False
        self._task = asyncio.ensure_future(self._read())
        self._seen = 0

    async def _read(self) -> None:
        try:
            while True:
                raw = await self.reader.readline()
                if not raw:
                    break
                self.raw.append(raw)
                self.lines.append(parse(raw.rstrip(b"\r\n")))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        self.closed = True

    def send(self, *texts: str | bytes) -> None:
        for text in texts:
            data = text if isinstance(text, bytes) else text.encode()
            self.writer.write(data if data.endswith(b"\n") else data + b"\r\n")

    async def expect(self, match: Callable[[Line], bool], timeout: float = 10.0, what: str = "") -> Line:
        """The first line after the last one expected that matches (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._seen, len(self.lines)):
                if match(self.lines[i]):
                    self._seen = i + 1
                    return self.lines[i]
            if time.monotonic() > deadline or (self.closed and self._seen >= len(self.lines) and not any(match(x) for x in self.lines[self._seen:])):
                got = "\n".join(format_line(x).decode().rstrip() for x in self.lines[self._seen :])
                raise AssertionError(f"no {what or 'matching line'} within {timeout}s; got after the last match:\n{got}")
            await asyncio.sleep(0.01)

    async def cmd(self, command: str, timeout: float = 10.0) -> Line:
        return await self.expect(lambda x: x.command == command, timeout, command)

    async def marker(self, token: str = "mark") -> list[Line]:
        """Everything up to a PONG for ``token``: a positive end for negative checks."""
        start = self._seen
        self.send(f"PING {token}")
        await self.expect(lambda x: x.command == "PONG" and x.params[-1] == token, what=f"PONG {token}")
        return self.lines[start : self._seen - 1]

    async def close(self) -> None:
        self.writer.close()
        self._task.cancel()


async def open_peer(port: int) -> Peer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return Peer(reader, writer)


async def register(peer: Peer, nick: str, caps: str = "", password: str = "") -> None:
    if caps:
        peer.send("CAP LS 302")
        await peer.cmd("CAP")
        peer.send(f"CAP REQ :{caps}")
        ack = await peer.cmd("CAP")
        assert ack.params[1] == "ACK", ack
    if password:
        peer.send(f"PASS {password}")
    peer.send(f"NICK {nick}", f"USER {nick} 0 * :{nick}")
    if caps:
        peer.send("CAP END")
    await peer.cmd("376")


@pytest.fixture
async def gateway(broker: RunningBroker) -> AsyncIterator[tuple[Gateway, int]]:
    """A gateway without accounts (the nick signs in) on the fixture broker."""
    gw = Gateway(broker.endpoint, Gatekeeper(None), history=20)
    port = await gw.start("127.0.0.1", 0)
    yield gw, port
    await gw.stop()


@pytest.fixture
async def irc(gateway: tuple[Gateway, int]) -> AsyncIterator[Callable[..., Awaitable[Peer]]]:
    """``await irc("alice", caps="server-time")``: a registered raw IRC peer."""
    peers: list[Peer] = []

    async def make(nick: str | None = None, caps: str = "", password: str = "") -> Peer:
        peer = await open_peer(gateway[1])
        peers.append(peer)
        if nick:
            await register(peer, nick, caps, password)
        return peer

    yield make
    for peer in peers:
        await peer.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Seconds ``zchat irc`` has to start listening. Only a hung start takes this long (one
#: that fails ends the wait at once); a start on a loaded machine takes seconds: 2-6 s
#: at load 16 on two cores, the broker subprocess before it 3-11 s at load 20.
START_WITHIN = 60.0


class IrcProcess:
    """``zchat irc`` as a subprocess, on a free port, until stop()."""

    def __init__(self, broker: BrokerProcess, env: dict[str, str], *extra: str) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "zchat", "irc", "--broker", broker.endpoint, "--listen", f"127.0.0.1:{self.port}", *extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started = time.monotonic()
        while time.monotonic() < started + START_WITHIN:
            if self.proc.poll() is not None:
                raise RuntimeError(f"zchat irc exited: {self.proc.stdout.read() if self.proc.stdout else ''}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)  # polling interval
        self.stop()
        raise RuntimeError(f"zchat irc did not listen within {START_WITHIN:g}s")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""


@pytest.fixture
def irc_proc(broker_proc: BrokerProcess, cli_env: dict[str, str], tmp_path: Path) -> Iterator[IrcProcess]:
    """``zchat irc`` with accounts in a private directory, on the subprocess broker."""
    proc = IrcProcess(broker_proc, cli_env, "--accounts-dir", str(tmp_path / "accounts"), "--history", "20", "--log-level", os.environ.get("ZCHAT_TEST_IRC_LOG", "INFO"))
    yield proc
    print(proc.stop())

