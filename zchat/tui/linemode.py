"""``zchat talk`` without a terminal: each input line is sent, each event printed as a line.

Used when stdin or stdout is not a terminal (a pipe, a container without a TTY) or
with ``--plain``. Slash commands work as in the full-screen client (``/join``,
``/msg``, ``/switch``...). Events go to stdout in the shared one-line format of
``zchat.render`` (as ``zchat tail`` prints them); command errors go to stderr as one
line. At the end of input (or ``/quit``) every line already typed is stored by the
broker before the program exits, so ``printf 'a\\nb\\n' | zchat talk --plain`` never
loses a line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from typing import Callable, TextIO

from zchat import protocol as p
from zchat import render
from zchat.client import Client, ClientError
from zchat.tui import commands as c

RATE_RETRIES = 50
STDIN_QUEUE = 256  # input lines read ahead of the sends


def _stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None], stream: TextIO | None = None) -> threading.Thread:
    """Read ``stream`` (stdin) in a daemon thread (works for pipes, files and terminals
    alike and never keeps the process alive at exit); None marks the end of input.

    The thread waits while ``queue`` is full, so a large pipe is read as fast as lines
    are sent, not into memory. A lone CR ends a line as LF does (``split_lines``)."""

    def put(item: str | None) -> bool:
        try:
            asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()
            return True
        except (RuntimeError, concurrent.futures.CancelledError):  # the loop is closing or closed
            return False

    def read() -> None:
        try:
            for chunk in stream if stream is not None else sys.stdin:
                for line in c.split_lines(chunk):
                    if not put(line):
                        return
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        put(None)

    thread = threading.Thread(target=read, name="zchat-stdin", daemon=True)
    thread.start()
    return thread


class LineMode:
    """One connected client driven by lines of text."""

    def __init__(
        self,
        client: Client,
        rooms: list[str],
        *,
        history: int = 0,
        out: Callable[[str], None] | None = None,
        err: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.rooms = list(dict.fromkeys(rooms))
        self.history = history
        self.out = out or (lambda line: print(line, flush=True))
        self.err = err or (lambda line: print(line, file=sys.stderr, flush=True))
        self.target = self.rooms[0] if self.rooms else ""  # a room, or "@name" for a DM
        self.failed = 0

    def error(self, message: str) -> None:
        self.err(f"zchat: error: {message}")

    async def run(self, lines: asyncio.Queue[str | None], stop: asyncio.Event | None = None) -> int:
        """Join, then handle ``lines`` in order until None (end of input), /quit or
        ``stop``. A line is sent (stored by the broker) before the next one is read, so
        output and sends keep the input's order. Returns the exit status: 0, or 1 if a
        line was refused by the broker."""
        for room in self.rooms:
            await self.client.join(room, history=self.history)
        printer = asyncio.ensure_future(self._print_events())
        worker = asyncio.ensure_future(self._handle_all(lines))
        stopper = asyncio.ensure_future((stop or asyncio.Event()).wait())
        try:
            await asyncio.wait({worker, stopper, printer}, return_when=asyncio.FIRST_COMPLETED)
            if worker.done():
                worker.result()
        finally:
            for task in (printer, worker, stopper):
                task.cancel()
            await asyncio.gather(printer, worker, stopper, return_exceptions=True)
        return 1 if self.failed else 0

    async def _handle_all(self, lines: asyncio.Queue[str | None]) -> None:
        while (line := await lines.get()) is not None:
            if not await self.handle(line):
                return

    async def _print_events(self) -> None:
        async for event in self.client.events():
            text = render.line(event, self.client.name)
            if text is not None:
                self.out(text)

    async def _send(self, target: str, text: str, me: bool) -> None:
        """Send one line; waits while the broker is away, retries when rate limited."""
        for attempt in range(RATE_RETRIES):
            try:
                if target.startswith("@"):
                    await self.client.send_dm(target[1:], text, me=me)
                else:
                    await self.client.send(target, text, me=me)
                return
            except ClientError as exc:
                if exc.code == p.ErrorCode.RATE_LIMITED and attempt + 1 < RATE_RETRIES:
                    await asyncio.sleep(min(2.0, 0.1 * (attempt + 1)))
                    continue
                self.failed += 1
                self.error(f"not sent to {_label(target)}: {exc.message} [{exc.code}]")
                return

    async def handle(self, line: str) -> bool:
        """Run one input line; False when it asks to quit."""
        try:
            action = c.parse(line)
        except c.CommandError as exc:
            self.error(str(exc))
            return True
        if action is None:
            return True
        try:
            return await self._run(action)
        except ClientError as exc:
            self.error(f"{exc.message} [{exc.code}]")
        except asyncio.TimeoutError:
            self.error("the broker did not answer in time (it may be restarting); try again")
        return True

    async def _run(self, action: c.Action) -> bool:
        client = self.client
        if isinstance(action, c.Say):
            if not self.target:
                self.error("not in a room: /join ROOM first")
            else:
                await self._send(self.target, action.text, action.me)
        elif isinstance(action, c.Msg):
            if action.text is None:
                self.target = "@" + action.to
                self.out(f"--- talking to @{action.to}")
            else:
                await self._send("@" + action.to, action.text, False)
        elif isinstance(action, c.Moderate):
            room = self.target
            if not room or room.startswith("@"):
                self.error(f"/{action.action} works in a room: /join one first")
            elif action.action == "topic" and action.text is None:
                joined = client.joined_info.get(room)
                self.out(f"--- topic of #{room}: {joined.topic if joined and joined.topic else '(none)'}")
            elif action.action == "topic":
                await client.set_topic(room, action.text or "")
            elif action.action in ("kick", "ban"):
                await getattr(client, action.action)(room, action.name, action.text or "")
            else:
                await getattr(client, action.action)(room, action.name)
        elif isinstance(action, c.Join):
            await client.join(action.room, private=action.private)
            if action.room not in self.rooms:
                self.rooms.append(action.room)
            self.target = action.room
            self.out(f"--- talking in #{action.room}")
        elif isinstance(action, c.Part):
            room = action.room or (self.target if not self.target.startswith("@") else "")
            if not room:
                self.error("/part needs a room here")
                return True
            await client.part(room)
            if room in self.rooms:
                self.rooms.remove(room)
            self.out(f"--- left #{room}")
            if self.target == room:
                self.target = self.rooms[0] if self.rooms else ""
                if self.target:
                    self.out(f"--- talking in #{self.target}")
        elif isinstance(action, c.Switch):
            self._switch(action.target)
        elif isinstance(action, c.Who):
            room = action.room or self.target
            if not room or room.startswith("@"):
                room = p.dm_room(client.name, room[1:]) if room else ""
            if not room:
                self.error("/who needs a room here")
                return True
            members = await client.who(room)
            online = [m.name for m in members if m.online]
            offline = [m.name for m in members if not m.online]
            self.out(f"--- {_label(room, client.name)}: {c.counted(len(members), 'member')}; online: {', '.join(online) or 'nobody'}"
                     + (f"; offline: {', '.join(offline)}" if offline else ""))
        elif isinstance(action, c.Rooms):
            for info in await client.rooms():
                self.out(f"--- #{info.name}: {c.counted(info.members, 'member')}, {info.online} online")
        elif isinstance(action, c.History):
            room = self.target if not self.target.startswith("@") else p.dm_room(client.name, self.target[1:])
            if not room:
                self.error("not in a room")
                return True
            for msg in await client.history(room, limit=action.count):
                self.out(render.line(msg, client.name) or "")
        elif isinstance(action, c.Help):
            try:
                for text in c.help_lines(action.command):
                    self.out(text)
            except c.CommandError as exc:
                self.error(str(exc))
        elif isinstance(action, c.Clear):
            pass  # nothing to clear on a stream
        elif isinstance(action, c.Quit):
            return False
        return True

    def _switch(self, target: str) -> None:
        if target.isdigit():
            index = int(target) - 1
            if index >= len(self.rooms):
                self.error(f"no window {target}: {len(self.rooms)} rooms joined")
                return
            target = self.rooms[index]
        elif not target.startswith("@") and target not in self.rooms:
            self.error(f"not in #{target}: /join {target} first")
            return
        self.target = target
        self.out(f"--- talking {'to' if target.startswith('@') else 'in'} {_label(target)}")


def _label(target: str, me: str = "") -> str:
    if target.startswith("@"):
        peers = p.dm_peers(target)
        if peers is None:
            return target
        return "@" + (peers[1] if peers[0] == me else peers[0])
    return f"#{target}"


async def run_line_mode(client: Client, rooms: list[str], history: int = 0, stop: asyncio.Event | None = None) -> int:
    """Read stdin until its end (or /quit or ``stop``), print events on stdout."""
    queue: asyncio.Queue[str | None] = asyncio.Queue(STDIN_QUEUE)
    _stdin_lines(asyncio.get_running_loop(), queue)
    return await LineMode(client, rooms, history=history).run(queue, stop)
