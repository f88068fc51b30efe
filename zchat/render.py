"""One-line text and JSON renderings of client events, shared by ``tail``, line-mode
``talk`` and the bots so that every plain-text view of a conversation looks the same."""

from __future__ import annotations

import time
from typing import Any

from zchat import protocol as p
from zchat.client import Event, Problem, Recovered, StateChange
from zchat.recovery import Gap


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def counted(n: int, word: str) -> str:
    """``1 member``, ``2 members``: counts read as English."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def where(msg: p.Msg, me: str = "") -> str:
    """``#room``, or ``@peer`` for a direct message seen by ``me``."""
    return label(msg.room, me)


def label(room: str, me: str = "") -> str:
    """``#room``, or ``@peer`` for the DM conversation ``room`` of ``me``."""
    peers = p.dm_peers(room)
    if peers is None:
        return f"#{room}"
    other = peers[1] if peers[0] == me else peers[0]
    return f"@{other}"


#: Moderation lines: who did what, as one sentence (the faces show them as action lines).
ACTIONS = frozenset({"invite", "kick", "ban", "unban", "topic", "op", "deop", "delete", "deleted"})


def action(msg: p.Msg) -> str:
    """``alice kicked bob (spam)``: a moderation line as a sentence."""
    why = f" ({msg.text})" if msg.text and msg.kind in ("kick", "ban") else ""
    verbs = {
        "invite": "invited", "kick": "kicked", "ban": "banned", "unban": "unbanned",
        "op": "made an operator:", "deop": "took operator status from",
    }
    if msg.kind == "topic":
        return f"{msg.sender} set the topic: {msg.text}" if msg.text else f"{msg.sender} cleared the topic"
    if msg.kind == "delete":
        return f"{msg.sender} deleted a message (#{msg.text})"
    if msg.kind == "deleted":
        return "(message deleted)"
    return f"{msg.sender} {verbs[msg.kind]} {msg.to}{why}"


def deleted_seq(msg: p.Msg) -> int:
    """The seq a ``delete`` line hides (0 for any other line)."""
    if msg.kind == "delete" and msg.text.isdigit():
        return int(msg.text)
    return 0


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
        if event.kind in ACTIONS:
            return f"{head} -!- {action(event)}"
        return f"{head} <{event.sender}> {event.text}"
    if isinstance(event, p.Presence):
        return f"{clock(event.ts)} #{event.room} --- {event.name} is {'online' if event.online else 'offline'}"
    if isinstance(event, StateChange):
        return f"{clock(event.since)} --- {event.state}{': ' + event.detail if event.detail else ''}"
    if isinstance(event, Gap):
        missed = counted(event.last - event.first + 1, "message")
        return f"--- {label(event.room, me)}: {missed} missing (#{event.first}..#{event.last}): {event.reason}"
    if isinstance(event, Problem):
        return f"--- broker problem: {event.message} [{event.code}]"
    if isinstance(event, Recovered):
        return None
    return None


def gap_json(gap: Gap) -> dict[str, Any]:
    """The JSON record of a Gap for scripts: seqs ``first..last`` of ``room`` are lost."""
    return {"kind": "gap", "room": gap.room, "first": gap.first, "last": gap.last, "reason": gap.reason}


def as_json(msg: p.Msg) -> dict[str, Any]:
    """The stable JSON shape of a message for scripts (``tail --json``)."""
    return {
        "room": msg.room, "seq": msg.seq, "id": msg.id, "ts": msg.ts, "sender": msg.sender,
        "kind": msg.kind, "text": msg.text, "to": msg.to, "epoch": msg.epoch,
    }
