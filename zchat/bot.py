"""A small scripted chat participant, for demos and smoke tests.

A bot joins one room, says a numbered line every ``every`` seconds (``count`` of them,
or forever with 0) and, with ``reply``, answers lines of others that mention its name.
It talks through ``zchat.client`` only: no sockets or protocol handling of its own.

Lines come from a template with ``{n}`` (the line number), ``{name}`` (the bot) and
``{peer}`` (the next other member of the room, in turn; "everyone" while alone), so
bots in one room address each other and their replies show that lines got across.

A reply starts with ``re @SENDER:`` and is never answered itself, so two bots cannot
answer each other forever; replies are also limited to ``max_replies_per_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from typing import Callable

from zchat import protocol as p
from zchat import render
from zchat.client import AuthError, Client, ClientError, ConnectError, Problem, StateChange
from zchat.recovery import Gap

log = logging.getLogger(__name__)

DEFAULT_SAY = "hello {peer}, this is line {n}"
REPLY_PREFIX = "re @"


def mentions(name: str, text: str) -> bool:
    """Whether ``text`` names ``name`` as a word (``alice``, ``@alice``, ``Alice,``)."""
    return re.search(rf"(?<![a-z0-9_-]){re.escape(name)}(?![a-z0-9_-])", text.lower()) is not None


def is_reply(text: str) -> bool:
    return text.startswith(REPLY_PREFIX)


def reply_text(sender: str, text: str, limit: int = 80) -> str:
    quoted = text if len(text) <= limit else text[: limit - 1] + "…"
    return f'{REPLY_PREFIX}{sender}: got "{quoted}"'


@dataclasses.dataclass
class BotOptions:
    room: str
    every: float = 5.0
    count: int = 0  # 0: forever
    reply: bool = False
    say: str = DEFAULT_SAY
    max_replies_per_s: float = 1.0

    def __post_init__(self) -> None:
        if not p.valid_room(self.room):
            raise ValueError(f"bad room name {self.room!r}: use a-z, 0-9, '_', '-', '.'")
        if not self.every > 0:
            raise ValueError(f"every must be above 0 seconds, got {self.every!r}")
        if self.count < 0:
            raise ValueError(f"count must be 0 (forever) or more, got {self.count!r}")
        if self.max_replies_per_s <= 0:
            raise ValueError("max_replies_per_s must be above 0")
        try:
            self.say.format(n=1, name="x", peer="y")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"bad --say template {self.say!r}: use {{n}}, {{name}} and {{peer}} ({exc})") from None


class Bot:
    """Runs one bot on a connected ``Client`` until its lines are said or ``stop()``."""

    def __init__(self, client: Client, options: BotOptions, out: Callable[[str], None] = print) -> None:
        self.client = client
        self.opts = options
        self.out = out
        self.name = client.name
        self.peers: set[str] = set()
        self._turn = 0
        self.said = 0
        self.replied = 0
        self.heard: list[p.Msg] = []
        self._stop = asyncio.Event()
        self._reply_times: list[float] = []
        self._replies: set[asyncio.Task] = set()
        self._started = 0.0

    def stop(self) -> None:
        self._stop.set()

    def next_peer(self) -> str:
        if not self.peers:
            return "everyone"
        ordered = sorted(self.peers)
        peer = ordered[self._turn % len(ordered)]
        self._turn += 1
        return peer

    async def run(self) -> None:
        """Join, then talk and listen; returns after ``count`` lines (plus one more
        ``every`` to answer late mentions) or when stopped."""
        self._started = time.time()
        members = await self.client.join(self.opts.room)
        self.peers = {m.name for m in members if m.name != self.name and m.online}
        self.out(f"{self.name} joined #{self.opts.room} (members: {', '.join(sorted(m.name for m in members))})")
        listener = asyncio.ensure_future(self._listen())
        talker = asyncio.ensure_future(self._talk())
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({talker, stopper, listener}, return_when=asyncio.FIRST_COMPLETED)
            if talker.done() and not self._stop.is_set():
                talker.result()  # raise what went wrong
                try:  # let mentions of the last line be answered
                    await asyncio.wait_for(self._stop.wait(), self.opts.every if self.opts.reply else 0.2)
                except asyncio.TimeoutError:
                    pass
            if listener.done():
                listener.result()
        finally:
            if self._replies:  # replies already under way get a moment to be stored
                await asyncio.wait(set(self._replies), timeout=2.0)
            tasks = (listener, talker, stopper, *self._replies)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _talk(self) -> None:
        opts = self.opts
        n = 0
        start = time.monotonic()
        while opts.count == 0 or n < opts.count:
            n += 1
            text = opts.say.format(n=n, name=self.name, peer=self.next_peer())
            try:
                stored = await self.client.send(opts.room, text)
            except ClientError as exc:
                log.warning("line %d not sent: %s", n, exc, extra={"code": exc.code})
                if exc.code == p.ErrorCode.RATE_LIMITED:
                    await asyncio.sleep(1.0)
            else:
                self.said += 1
                log.debug("stored", extra={"room": stored.room, "seq": stored.seq})
            if opts.count and n >= opts.count:
                break
            # keep to the schedule rather than drifting by the send time
            delay = start + n * opts.every - time.monotonic()
            await asyncio.sleep(max(0.0, delay))

    async def _listen(self) -> None:
        async for event in self.client.events():
            if isinstance(event, StateChange):
                self.out(f"* {event.state}{': ' + event.detail if event.detail else ''}")
            elif isinstance(event, p.Presence):
                if event.room == self.opts.room and event.name != self.name:
                    (self.peers.add if event.online else self.peers.discard)(event.name)
            elif isinstance(event, p.Msg) and event.room == self.opts.room:
                await self._heard(event)
            elif isinstance(event, (Gap, Problem)):  # lost lines and broker complaints are shown
                self.out(render.line(event, self.name) or "")

    async def _heard(self, msg: p.Msg) -> None:
        self.heard.append(msg)
        if msg.sender != self.name:
            if msg.kind == "part":
                self.peers.discard(msg.sender)
            else:
                self.peers.add(msg.sender)
        if msg.kind == "text":
            self.out(f"[#{msg.room} {msg.seq}] {msg.sender}: {msg.text}")
        elif msg.kind == "me":
            self.out(f"[#{msg.room} {msg.seq}] * {msg.sender} {msg.text}")
        else:
            self.out(f"[#{msg.room} {msg.seq}] -- {msg.sender} {msg.kind}s")
        if (
            self.opts.reply
            and msg.kind in ("text", "me")
            and msg.sender != self.name
            and msg.ts >= self._started - 1.0  # not old history
            and not is_reply(msg.text)
            and mentions(self.name, msg.text)
            and self._may_reply()
        ):
            # answered in its own task, so listening never waits for the ack
            task = asyncio.ensure_future(self._reply(msg))
            self._replies.add(task)
            task.add_done_callback(self._replies.discard)

    async def _reply(self, msg: p.Msg) -> None:
        try:
            await self.client.send(self.opts.room, reply_text(msg.sender, msg.text), timeout=10.0)
            self.replied += 1
        except (ClientError, asyncio.TimeoutError) as exc:
            log.warning("reply to %s not sent: %s", msg.sender, exc)

    def _may_reply(self) -> bool:
        now = time.monotonic()
        window = [t for t in self._reply_times if now - t < 1.0]
        if len(window) >= self.opts.max_replies_per_s:
            self._reply_times = window
            return False
        window.append(now)
        self._reply_times = window
        return True


async def run_bot(
    broker: str,
    name: str,
    options: BotOptions,
    *,
    secret: str | None = None,
    connect_for: float = 60.0,
    out: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> Bot:
    """Connect (retrying while the broker is unreachable, up to ``connect_for`` seconds),
    run the bot, close. Raises AuthError if the name belongs to someone else and
    ConnectError if the broker never answered."""
    deadline = time.monotonic() + connect_for
    delay = 0.5
    while True:
        client = Client(broker, name, secret, label=f"zchat-bot/{name}")
        try:
            await client.connect(timeout=min(5.0, max(1.0, deadline - time.monotonic())))
            break
        except AuthError:
            raise
        except ConnectError as exc:
            if time.monotonic() + delay >= deadline:
                raise
            log.info("broker not answering yet (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    bot = Bot(client, options, out)
    watcher = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if watcher is not None:
        watcher.add_done_callback(lambda _: bot.stop())
    try:
        await bot.run()
    finally:
        if watcher is not None:
            watcher.cancel()
        await client.close()
    return bot
