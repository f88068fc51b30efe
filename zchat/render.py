"""One-line text and JSON renderings of client events, shared by ``tail``, line-mode
``talk`` and the bots so that every plain-text view of a conversation looks the same."""

from __future__ import annotations

import time
from typing import Any

from zchat import protocol as p
from zchat.client import Event, Recovered, StateChange
from zchat.recovery import Gap


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def where(msg: p.Msg, me: str = "") -> str:
    """``#room``, or ``@peer`` for a direct message seen by ``me``."""
    peers = p.dm_peers(msg.room)
    if peers is None:
        return f"#{msg.room}"
    other = peers[1] if peers[0] == me else peers[0]
    return f"@{other}"


def line(event: Event, me: str = "") -> str | None:
    """A human line for ``event``, or None for events not worth a line."""
    if isinstance(event, p.Msg):
        head = f"{clock(event.ts)} {where(event, me)}"
        if event.kind == "me":
            return f"{head} * {event.sender} {event.text}"
        if event.kind == "join":
            return f"{head} --> {event.sender} joined"
        if event.kind == "part":
            return f"{head} <-- {event.sender} left"
        return f"{head} <{event.sender}> {event.text}"
    if isinstance(event, p.Presence):
        return f"{clock(event.ts)} #{event.room} --- {event.name} is {'online' if event.online else 'offline'}"
    if isinstance(event, StateChange):
        return f"{clock(event.since)} --- {event.state}{': ' + event.detail if event.detail else ''}"
    if isinstance(event, Gap):
        return f"--- #{event.room}: messages {event.first}..{event.last} could not be recovered ({event.reason})"
    if isinstance(event, Recovered):
        return None
    return None


def as_json(msg: p.Msg) -> dict[str, Any]:
    """The stable JSON shape of a message for scripts (``tail --json``)."""
    return {
        "room": msg.room, "seq": msg.seq, "id": msg.id, "ts": msg.ts, "sender": msg.sender,
        "kind": msg.kind, "text": msg.text, "to": msg.to, "epoch": msg.epoch,
    }
