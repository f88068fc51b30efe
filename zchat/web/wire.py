"""The WebSocket protocol between the page and the gateway (docs/web.md, "The WebSocket").

JSON text frames, each an object tagged by ``t``. What the page may send is a closed
set of small typed structs, decoded with msgspec, so a bad frame is one clear error
(``bad_frame``) and never reaches the client library. What the gateway sends is built
here too, so the page and docs/web.md have one definition to follow.

The gateway adds nothing to zchat's promises: messages carry the broker's room, seq,
id and ts, and a tab that reconnects says the last seq it holds per room (``hello``'s
``since``) to get exactly what it missed.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from zchat import protocol as p
from zchat import render

#: The largest frame a page may send (a chat line is at most the broker's max_bytes).
MAX_FRAME = 128 * 1024
#: Most messages one ``history`` request returns (a page of older history).
MAX_PAGE = 200
#: Characters a frame of messages holds, about (one message bigger than that goes
#: alone): each tab's queue is bounded in bytes, so frames are small parts of it.
FRAME_LIMIT = 64 * 1024


class _In(msgspec.Struct, tag_field="t", forbid_unknown_fields=True, frozen=True):
    pass


Seq = Annotated[int, Meta(ge=0, le=p.MAX_INT)]
Text = Annotated[str, Meta(max_length=p.MAX_MESSAGE_BYTES)]
Ref = Annotated[str, Meta(min_length=1, max_length=64)]


class Hello(_In, tag="hello"):
    """First frame of a tab: ``since`` is room -> [epoch, last seq the tab holds]; rooms
    it leaves out (a fresh tab) get their newest messages."""

    since: dict[str, tuple[str, Seq]] = {}


class Send(_In, tag="send"):
    """A line to ``room`` or a DM to ``to``; ``ref`` is the page's id for it: the same
    ref sent again (after a reconnect) is the same line, never a second one."""

    ref: Ref
    text: Text
    room: str = ""
    to: str = ""
    me: bool = False


class Join(_In, tag="join"):
    room: str


class Part(_In, tag="part"):
    room: str


class Who(_In, tag="who"):
    room: str


class History(_In, tag="history"):
    """Older messages of ``room``, below seq ``before`` (scrolled to the top)."""

    room: str
    before: Seq
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE)] = 50


Incoming = Hello | Send | Join | Part | Who | History
_decoder = msgspec.json.Decoder(Incoming)


class FrameError(Exception):
    """A frame from the page that is not one of ours: said back as ``error``/``bad_frame``."""


def decode(data: str | bytes) -> Incoming:
    """One frame from the page, or FrameError saying what was wrong with it."""
    if len(data) > MAX_FRAME:
        raise FrameError(f"frame of {len(data)} bytes; at most {MAX_FRAME}")
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise FrameError(f"bad frame: {exc}") from None
    except msgspec.DecodeError as exc:
        raise FrameError(f"not JSON: {exc}") from None


# ------------------------------------------------------------------ gateway -> page

_encoder = msgspec.json.Encoder()


def encode(obj: object) -> str:
    return _encoder.encode(obj).decode()


def msg(m: p.Msg) -> dict:
    """A stored message as the page sees it (the broker's fields, minus the sender's cid);
    a moderation line also carries its sentence (``action``), worded as every face words it."""
    out = {"room": m.room, "seq": m.seq, "id": m.id, "ts": m.ts, "sender": m.sender, "text": m.text, "kind": m.kind, "to": m.to}
    if m.kind in render.ACTIONS:
        out["action"] = render.action(m)
    return out


def members(ms: list[p.Member]) -> list[dict]:
    return [{"name": m.name, "online": m.online} for m in ms]


def frame(t: str, **fields: object) -> str:
    """Any gateway frame: ``{"t": t, **fields}`` as JSON text."""
    return encode({"t": t, **fields})


def frames(t: str, items: list[dict], limit: int, **fields: object) -> list[str]:
    """``{"t": t, **fields, "items": [...]}`` frames of at most about ``limit``
    characters each (an item bigger than that goes alone): a tab's queue is bounded in
    bytes, so no frame may be a large part of it. Each item is encoded once."""
    head = encode({"t": t, **fields})[:-1] + ',"items":['
    out: list[str] = []
    part: list[str] = []
    size = 0
    for item in items:
        text = encode(item)
        if part and size + len(text) > limit:
            out.append(head + ",".join(part) + "]}")
            part, size = [], 0
        part.append(text)
        size += len(text) + 1
    if part or not out:
        out.append(head + ",".join(part) + "]}")
    return out
