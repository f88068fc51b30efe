"""``zchat talk`` without a terminal: a real subprocess with pipes, a real broker process.

Lines written to its stdin are sent (slash commands work), events come out of its
stdout one line each, errors go to stderr as one line, and at the end of input every
line is stored before it exits.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest

from tests.conftest import BrokerProcess, collect, free_port_base, wait_for
from zchat import protocol as p
from zchat.client import Client

SECRET = "secret-of-bob-0123456789"


class Talk:
    """A running ``zchat talk`` with its output collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            asyncio.ensure_future(self._read(proc.stdout, self.out)),
            asyncio.ensure_future(self._read(proc.stderr, self.err)),
        ]

    @classmethod
    async def start(cls, env: dict[str, str], *args: str) -> "Talk":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "zchat", "talk", *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        return cls(proc)

    @staticmethod
    async def _read(stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        while line := await stream.readline():
            into.append(line.decode().rstrip("\n"))

    async def type(self, *lines: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(line + "\n" for line in lines).encode())
        await self.proc.stdin.drain()

    async def wait_out(self, text: str, timeout: float = 10.0) -> str:
        await wait_for(lambda: any(text in line for line in self.out), timeout, f"{text!r} on stdout; got {self.out} / {self.err}")
        return next(line for line in self.out if text in line)

    async def finish(self, timeout: float = 20.0) -> int:
        """Close stdin (end of input) and wait for the exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(*self._readers), timeout)
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for reader in self._readers:
            reader.cancel()


async def bob_on(broker: BrokerProcess) -> Client:
    bob = Client(broker.endpoint, "bob", SECRET)
    await bob.connect()
    await bob.join("general")
    return bob


async def test_lines_in_events_out_commands_and_errors(broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    bob = await bob_on(broker_proc)
    # no --plain: stdin and stdout are pipes, so talk picks the line mode by itself
    talk = await Talk.start(cli_env, "--broker", broker_proc.endpoint, "--name", "alice", "--room", "general")
    try:
        (joined,) = await collect(bob, 1)
        assert (joined.sender, joined.kind) == ("alice", "join")

        await bob.send("general", "hi alice")
        (echo,) = await collect(bob, 1)  # bob's own line comes back to him too
        assert echo.text == "hi alice"
        line = await talk.wait_out("<bob> hi alice")
        assert line.endswith(" #general <bob> hi alice")

        await talk.type("hello bob", "/me waves", "/msg bob psst", "//not a command")
        got = await collect(bob, 4)
        assert [(m.room, m.kind, m.text) for m in got] == [
            ("general", "text", "hello bob"),
            ("general", "me", "waves"),
            (p.dm_room("alice", "bob"), "text", "psst"),
            ("general", "text", "/not a command"),
        ]
        await talk.wait_out("* alice waves")
        await talk.wait_out("@bob <alice> psst")  # her own DM, shown as the conversation with bob

        await talk.type("/jion dev")
        await wait_for(lambda: talk.err, 10, "an error line")
        assert talk.err == ["zchat: error: unknown command /jion: did you mean /join?"]

        await talk.type("/who")
        who = await talk.wait_out("members; online:")
        assert who == "--- #general: 2 members; online: alice, bob"

        await talk.type("/join dev", "in dev now", "/switch general", "back in general")
        await talk.wait_out("talking in #dev")
        await talk.wait_out("#dev <alice> in dev now")
        await talk.wait_out("#general <alice> back in general")

        await talk.type("/msg nobody hello")
        await wait_for(lambda: len(talk.err) == 2, 10, "a second error line")
        assert talk.err[1] == "zchat: error: not sent to @nobody: no user 'nobody' [unknown_user]"

        assert await talk.finish() == 1  # a line was refused: the status says so
        assert not any("Traceback" in line for line in talk.out + talk.err)
    finally:
        await talk.kill()
        await bob.close()


async def test_a_burst_from_a_pipe_is_stored_once_in_order(broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    """150 lines at once (more than the broker's burst of 100): all stored, in order, once."""
    talk = await Talk.start(cli_env, "--plain", "--broker", broker_proc.endpoint, "--name", "alice", "--room", "general")
    try:
        await talk.type(*(f"line {n}" for n in range(150)))
        assert await talk.finish(timeout=40) == 0, talk.err
    finally:
        await talk.kill()
    bob = await bob_on(broker_proc)
    try:
        stored = [m.text for m in await bob.history("general", limit=1000) if m.sender == "alice" and m.kind == "text"]
        assert stored == [f"line {n}" for n in range(150)]
    finally:
        await bob.close()


async def test_without_a_name_and_a_terminal_it_says_how_to_give_one(cli_env: dict[str, str]) -> None:
    talk = await Talk.start(cli_env, "--broker", "tcp://127.0.0.1:9")
    try:
        assert await talk.finish() == 2
        assert any("no name: give --name NAME" in line for line in talk.err), talk.err
    finally:
        await talk.kill()


async def test_an_unreachable_broker_is_exit_status_3(cli_env: dict[str, str]) -> None:
    port = free_port_base()
    start = time.monotonic()
    talk = await Talk.start(cli_env, "--broker", f"tcp://127.0.0.1:{port}", "--name", "alice")
    try:
        assert await talk.finish(timeout=20) == 3
        assert any("no answer from the broker" in line for line in talk.err), talk.err
        assert time.monotonic() - start < 15
    finally:
        await talk.kill()


@pytest.mark.parametrize("room", ["Bad Room!"])
async def test_a_bad_room_is_a_usage_error(cli_env: dict[str, str], room: str) -> None:
    talk = await Talk.start(cli_env, "--name", "alice", "--room", room)
    try:
        assert await talk.finish() == 2
        assert any("bad room name" in line for line in talk.err), talk.err
    finally:
        await talk.kill()


async def test_three_lines_in_one_write_are_each_sent_once_in_order(broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    """Issue 11 in the line mode: lines that arrive together are neither merged nor
    dropped, whatever ends them (LF, CR LF, a lone CR, or the end of input)."""
    talk = await Talk.start(cli_env, "--plain", "--broker", broker_proc.endpoint, "--name", "alice", "--room", "general")
    try:
        assert talk.proc.stdin is not None
        await talk.type("/who", "/rooms")  # alone in the room: "1 member"
        await talk.wait_out("--- #general: 1 member; online: alice")
        await talk.wait_out("--- #general: 1 member, 1 online")
        talk.proc.stdin.write(b"yes, 1.4 is out\n/me celebrates\nthird line\r\nfourth\rfifth, no newline")
        await talk.proc.stdin.drain()
        assert await talk.finish() == 0, talk.err
    finally:
        await talk.kill()
    bob = await bob_on(broker_proc)
    try:
        stored = [(m.kind, m.text) for m in await bob.history("general", limit=100) if m.sender == "alice" and m.kind in ("text", "me")]
        assert stored == [("text", "yes, 1.4 is out"), ("me", "celebrates"), ("text", "third line"), ("text", "fourth"), ("text", "fifth, no newline")]
    finally:
        await bob.close()


async def test_stdin_is_read_no_faster_than_lines_are_taken() -> None:
    """The reader thread stops at the queue's bound instead of reading a large pipe into memory."""
    import io
    import os

    from zchat.tui.linemode import _stdin_lines

    rfd, wfd = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(wfd, b"".join(b"line %d\n" % n for n in range(20000))), os.close(wfd)))
    writer.start()  # more than a pipe buffer holds: written as they are read
    stream = io.TextIOWrapper(io.FileIO(rfd, "r"), encoding="utf-8")
    queue: asyncio.Queue[str | None] = asyncio.Queue(50)
    thread = _stdin_lines(asyncio.get_running_loop(), queue, stream)
    await wait_for(queue.full, 10, "the queue full")
    # the reader is now blocked on the full queue: take one line and it puts exactly one more
    assert writer.is_alive()  # the rest of the 200 kB is still waiting to get into the pipe
    assert queue.get_nowait() == "line 0"
    await wait_for(queue.full, 10, "the queue full again")
    assert queue.qsize() == 50
    got = ["line 0"]
    while (line := await asyncio.wait_for(queue.get(), 10)) is not None:
        got.append(line)
        assert queue.qsize() <= 50
    assert got == [f"line {n}" for n in range(20000)]
    thread.join(10)
    writer.join(10)
    assert not thread.is_alive()
    stream.close()
