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

import struct
from typing import Annotated

import msgspec
from msgspec import Meta

from zchat import protocol as p
from zchat import render
from zchat.client import Gap, Problem, StateChange

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
    if m.ref or m.edited:  # an edit or delete line names its line; an edited line says so
        out["ref"], out["edited"] = m.ref, m.edited
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
    return joined(t, [encode(item) for item in items], limit, **fields)


def joined(t: str, texts: list[str], limit: int, **fields: object) -> list[str]:
    """``frames`` of items encoded already (``texts``, each one JSON object)."""
    head = encode({"t": t, **fields})[:-1] + ',"items":['
    out: list[str] = []
    part: list[str] = []
    size = 0
    for text in texts:
        if part and size + len(text) > limit:
            out.append(head + ",".join(part) + "]}")
            part, size = [], 0
        part.append(text)
        size += len(text) + 1
    if part or not out:
        out.append(head + ",".join(part) + "]}")
    return out


def item(ev: object) -> dict | None:
    """A live event of the client as an ``events`` item, or None for one the page is not told."""
    if isinstance(ev, p.Msg):
        return {"t": "msg", **msg(ev)}
    if isinstance(ev, p.Presence):
        return {"t": "presence", "room": ev.room, "name": ev.name, "online": ev.online}
    if isinstance(ev, StateChange):
        return {"t": "state", "state": ev.state, "detail": ev.detail}
    if isinstance(ev, Gap):
        return {"t": "gap", "room": ev.room, "first": ev.first, "last": ev.last, "reason": ev.reason}
    if isinstance(ev, Problem):
        return {"t": "problem", "code": ev.code, "message": ev.message}
    return None


class _Bounded:
    """A dict of encodings bounded in entries and in total length; the oldest go first."""

    def __init__(self, max_entries: int, max_size: int, max_item: int | None = None) -> None:
        self.max_entries = max_entries
        self.max_size = max_size
        self.max_item = max_size // 64 if max_item is None else max_item
        self.table: dict[object, tuple[object, int]] = {}  # key -> (value, its size)
        self.size = 0

    def keep(self, key: object, value: object, size: int, replace: bool = False) -> None:
        if size > self.max_item:
            return  # a big line is encoded per user rather than crowding out the rest
        old = self.table.pop(key, None) if replace else self.table.get(key)
        if old is not None:
            if not replace:
                return
            self.size -= old[1]
        self.table[key] = (value, size)
        self.size += size
        while len(self.table) > self.max_entries or self.size > self.max_size:
            self.size -= self.table.pop(next(iter(self.table)))[1]

    def get(self, key: object) -> object:
        got = self.table.get(key)
        return None if got is None else got[0]


class Shared:
    """Encodings shared by every user of the gateway: one line into a room of 500 web
    users reaches the gateway 500 times (a Client each, each decoding its own copy), and
    is turned into JSON once. The key is the whole event (frozen protocol structs: equal
    fields, equal JSON), never only its room and seq, so a DM, a private room's line or
    a line edited since can only ever be given its own text (a batch: its ends and
    length, and the whole batch compared on a hit). Bounded in entries and in
    characters (``max_entries``, ``max_chars`` each for items and for whole frames)."""

    def __init__(self, max_entries: int = 1024, max_chars: int = 2 * 1024 * 1024) -> None:
        self._texts = _Bounded(max_entries, max_chars)  # event -> its item as JSON text
        # a chunk (an event, or a batch) -> its frames; a batch of 256 lines (a broker
        # that fell behind) is about 50 KB of frames: kept too, or every user of the
        # room would encode it again just when the gateway is behind already
        self._frames = _Bounded(max_entries, max_chars, max_item=max_chars // 8)
        self.hits = 0  # encodings taken from here rather than made

    def text(self, ev: object) -> str | None:
        """The item of ``ev`` as JSON text (None for an event the page is not told)."""
        if not isinstance(ev, (p.Msg, p.Presence)):  # rare, and per user: not worth keeping
            got = item(ev)
            return None if got is None else encode(got)
        text = self._texts.get(ev)
        if text is None:
            text = encode(item(ev))
            self._texts.keep(ev, text, len(text))
        else:
            self.hits += 1
        return text  # type: ignore[return-value]

    def frames(self, evs: list) -> list[tuple[bytes, bytes]]:
        """The ``events`` frames of a chunk of lines and presence changes (one line, or a
        batch the broker published at once), each as (UTF-8 JSON, the same with its
        WebSocket header), made once for every user the chunk reaches."""
        # A batch is keyed on its ends and length (hashing every line of it for every user
        # cost more than the rest of the lookup) and checked whole on a hit: equal events.
        one = len(evs) == 1
        key = evs[0] if one else (evs[0], evs[-1], len(evs))
        got = self._frames.get(key)
        if got is None or not (one or got[0] == evs):  # type: ignore[index]
            texts = [self.text(ev) for ev in evs]
            out = _events_frames(texts)  # type: ignore[arg-type]
            self._frames.keep(key, (list(evs), out), sum(len(data) + len(whole) for data, whole in out), replace=True)
            return out
        self.hits += 1
        return got[1]  # type: ignore[index]

    def __len__(self) -> int:
        return len(self._texts.table) + len(self._frames.table)


_SHAREABLE = frozenset({p.Msg, p.Presence})


def events(shared: Shared, evs: list) -> list[tuple[bytes, bytes]]:
    """The ``events`` frames of one chunk the client delivered, each as (UTF-8 JSON, the
    same with its WebSocket header): from ``shared`` when the chunk is lines and presence
    changes only (as nearly every chunk is), else made for this user."""
    if len(evs) == 1:  # the usual chunk: one line
        if type(evs[0]) in _SHAREABLE:
            return shared.frames(evs)
    elif evs and set(map(type, evs)) <= _SHAREABLE:
        return shared.frames(evs)
    texts = [t for t in map(shared.text, evs) if t is not None]
    return _events_frames(texts) if texts else []


def _events_frames(texts: list[str]) -> list[tuple[bytes, bytes]]:
    return [(data, framed(data)) for data in (f.encode() for f in joined("events", texts, FRAME_LIMIT))]


def framed(data: bytes) -> bytes:
    """``data`` as one unmasked WebSocket text frame (RFC 6455 §5.2: a server's frames
    are not masked), the header aiohttp's writer would put before it."""
    n = len(data)
    if n < 126:
        head = struct.pack("!BB", 0x81, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 127, n)
    return head + data
