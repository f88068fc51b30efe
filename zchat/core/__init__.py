"""The broker's state machine, sans I/O: rooms, members, sessions, presence,
sequence numbers, dedup and rate limits.

The asyncio shell (zchat.broker) feeds it decoded bodies, the authenticated user
name (from ZAP's User-Id, never from a payload) and the time; the core fills an
``Outcome`` with what to store, publish and reply. It never touches a socket, a clock
or storage, so tests drive it with plain values.

``Core`` is one class made of one part per concern, each in its own file:
rooms (membership, pages, caps), sessions (presence, expiry, eviction), lines (the
chat-line hot path), sequence (seqs, ids, dedup, undo), limits (buckets, budgets),
moderation (private rooms, operators, admins, wire-topic tokens), search (who may
find what) and edits (senders changing their own lines).
This file holds its state and routes each request to the part that owns it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable, Iterable

from zchat import protocol as p
from zchat.core.edits import Edits
from zchat.core.limits import Budgets, Limits, TokenBucket
from zchat.core.lines import Lines
from zchat.core.moderation import Moderation
from zchat.core.outcome import (
    BROKER_SCOPE,
    EditQuery,
    HistoryQuery,
    Outcome,
    RoomChange,
    SearchQuery,
)
from zchat.core.rooms import Rooms
from zchat.core.search import Searching
from zchat.core.sequence import Dedup, RecentCids, Sequencing
from zchat.core.sessions import Session, Sessions, valid_sid
from zchat.protocol import ErrorCode as E

__all__ = [
    "BROKER_SCOPE", "Core", "Dedup", "EditQuery", "HistoryQuery", "Limits", "Outcome", "RecentCids", "RoomChange", "SearchQuery",
    "Session", "TokenBucket", "valid_sid",
]

_LOOKER = p.LOOKER
_LIMITS = Limits()  # the default (frozen: one is enough)


def _counting_tokens() -> Callable[[], str]:
    """Tokens for tests (the broker gives random ones): 1, 2, 3... in hex."""
    counter = itertools.count(1)
    return lambda: f"{next(counter):x}"


class Core(Rooms, Sessions, Lines, Sequencing, Budgets, Moderation, Searching, Edits):
    """The broker's state. Every ``now`` it is given is MONOTONIC seconds (rate buckets,
    presence, dedup windows); timestamps on the wire are ``now + wall_offset``, which the
    shell keeps at ``time.time() - time.monotonic()`` (0.0 in tests: ts == now).

    ``rooms_state`` is what Storage.rooms_state gave (room settings: private, operators,
    bans, invites, topics); ``new_token`` makes the wire-topic tokens (random, from the
    shell); ``admins`` names the broker's admins."""

    def __init__(
        self,
        *,
        epoch: str,
        boot: str,
        limits: Limits = _LIMITS,
        heads: dict[str, int] | None = None,
        members: dict[str, set[str]] | None = None,
        users: Iterable[str] = (),
        recent: Iterable[p.Msg] = (),
        id_prefix: str = "",
        wall_offset: float = 0.0,
        rooms_state: dict[str, dict[str, set[str]]] | None = None,
        new_token: Callable[[], str] | None = None,
        admins: Iterable[str] = (),
    ) -> None:
        self.epoch = epoch
        self.boot = boot
        self.limits = limits.effective()
        self.wall_offset = wall_offset
        self.heads: dict[str, int] = dict(heads or {})
        self.members: dict[str, set[str]] = {room: set(names) for room, names in (members or {}).items() if names}
        self.rooms_of: dict[str, set[str]] = {}
        for room, names in self.members.items():
            for name in names:
                self.rooms_of.setdefault(name, set()).add(room)
        self.users: set[str] = set(users) | set(self.rooms_of)
        self.users.discard(_LOOKER)
        self.sessions: dict[str, Session] = {}
        self.devices: dict[str, set[str]] = {}  # name -> live session ids
        self.elsewhere: set[str] = set()  # names online on another broker of the set (several brokers)
        self.buckets: dict[str, TokenBucket] = {}  # name -> chat line bucket
        self.request_buckets: dict[str, TokenBucket] = {}  # name -> request bucket
        self.moderation_buckets: dict[str, TokenBucket] = {}  # name -> moderation bucket
        self.search_buckets: dict[str, TokenBucket] = {}  # name -> search bucket
        self.room_buckets: dict[str, TokenBucket] = {}  # public room -> line bucket
        # Sorted names of the public rooms with members: `rooms` pages with bisect.
        self.room_index: list[str] = sorted(room for room in self.members if not p.is_dm_room(room))
        self.online_in: dict[str, int] = {}  # room -> members online, kept as they come and go
        self._member_index: dict[str, list[str]] = {}  # room -> sorted members, made on a `who`
        # Names (and rooms) whose per-user (per-room) state tick may evict, each once.
        self._tracked: set[str] = set()
        self._sweep_users: deque[str] = deque()
        self._sweep_rooms: deque[str] = deque()
        self.dedup = Dedup(limits.dedup_per_user, limits.dedup_total, limits.dedup_window)
        for msg in sorted((m for m in recent if m.cid), key=lambda m: m.ts):
            self.dedup.add(msg.sender, p.Stored(msg.cid, msg.room, msg.seq, msg.id, msg.ts), msg.ts - wall_offset)
            self._track(msg.sender)
        self.id_prefix = id_prefix  # message ids are id_prefix + counter in hex
        self.counter = 0
        self.topics: dict[str, bytes] = {}  # room -> topic frame, made once (and again when its token changes)
        # Room settings (zchat.core.moderation): room -> role -> values, the private rooms,
        # and the wire-topic tokens (private rooms from the start, others once rotated).
        self.new_token = new_token or _counting_tokens()
        self.admins: set[str] = set(admins)
        self.roles: dict[str, dict[str, set[str]]] = {}
        self.private: set[str] = set()
        self.tokens: dict[str, str] = {}
        # What earlier owners of a released name left (zchat.core.moderation): the wall
        # time of its last release, and per DM conversation the head at that time.
        self.released_at: dict[str, float] = {}
        self.dm_floors: dict[tuple[str, str], int] = {}
        self._load_roles(rooms_state or {})
        # sender -> to -> (DM room, inbox topics), made on the first good line between them
        self.dms: dict[str, dict[str, tuple[str, tuple[bytes, ...]]]] = {}
        self.counters: dict[str, int] = {}
        self._wait_texts: dict[float, str] = {}  # retry_after -> the rate_limited message, recently used

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # ------------------------------------------------------------ requests

    def request(self, sid: str, name: str, req: p.Request, now: float, out: Outcome) -> None:
        """Handle one DEALER request from ``sid``, authenticated as ``name``.

        Every request draws from the user name's request bucket first (look-only
        sessions all share the bucket of LOOKER: that also bounds how many of them live).
        """
        lim = self.limits
        if lim.request_rate > 0:
            bucket = self.request_buckets.get(name)
            if bucket is None:
                bucket = self.request_buckets[name] = TokenBucket(lim.request_burst, now)
                self._track(name)
            wait = bucket.take(lim.request_rate, lim.request_burst, now)
            if wait:
                self.count("requests_limited")
                out.error(sid, E.RATE_LIMITED, f"too many requests: try again in {wait:.2f}s", rid=req.rid, retry_after=wait)
                return
        else:
            self._track(name)
        if isinstance(req, p.Hello):
            self.hello(sid, name, req, now, out)
            return
        if self._session(sid, name, req.rid, now, out) is None:
            return
        if isinstance(req, p.Ping):
            pong = (sid, p.Pong(rid=req.rid, boot=self.boot, epoch=self.epoch, heads=self.heads_of(name), tokens=self.tokens_of(name)))
            if not req.lazy:
                out.replies.append(pong)
            elif out.later is None:
                out.later = [pong]
            else:
                out.later.append(pong)
        elif isinstance(req, (p.Join, p.Part)):
            if name == _LOOKER:
                verb = "join" if isinstance(req, p.Join) else "part"
                out.error(sid, E.FORBIDDEN, f"sign in with a name to {verb} rooms", rid=req.rid)
            elif isinstance(req, p.Join):
                self._join(sid, name, req, now, out)
            else:
                self._part(sid, name, req, now, out)
        elif isinstance(req, p.History):
            self._history(sid, name, req, out)
        elif isinstance(req, p.Search):
            self._search(sid, name, req, now, out)
        elif isinstance(req, (p.Edit, p.Delete)):
            self.edit_request(sid, name, req, now, out)
        elif isinstance(req, p.Who):
            if self._readable(sid, name, req.room, req.rid, out):
                members, more = self.member_page(req.room, req.after)
                out.replies.append((sid, p.WhoReply(rid=req.rid, room=req.room, members=members, more=more)))
        elif isinstance(req, p.Moderate):
            self.moderate(sid, name, req, now, out)
        elif isinstance(req, p.Admin):
            self.admin(sid, name, req, now, out)
        elif isinstance(req, p.Rooms):
            rooms, more = self.room_page(req.after, name)
            out.replies.append((sid, p.RoomsReply(rid=req.rid, rooms=rooms, more=more)))
        elif isinstance(req, p.Bye):
            self._close_session(sid, now, out)
            out.replies.append((sid, p.Ok(rid=req.rid)))
        elif isinstance(req, p.Status):
            out.replies.append((sid, self.status(req.rid)))

    def status(self, rid: int = 0) -> p.StatusReply:
        """What the core knows for ``zchat status``: counts, limits, counters. The shell
        fills in the rest (version, uptime, storage, rates) before sending it."""
        lim = self.limits
        limits: dict[str, p.LimitValue] = {
            f.name: getattr(lim, f.name) for f in dataclasses.fields(lim) if f.name not in ("pull_port", "pub_port")
        }
        public = len(self.room_index)
        private = sum(1 for room in self.private if room in self.members)
        return p.StatusReply(
            rid=rid, version="", boot=self.boot, epoch=self.epoch, uptime=0.0, storage="", storage_bytes=-1,
            sessions=len(self.sessions), users_online=len(self.devices), users=len(self.users),
            rooms=public + private, conversations=len(self.members) - public - private, messages=sum(self.heads.values()),
            limits=limits, counters=dict(self.counters),
        )

    def shutdown(self, now: float, out: Outcome) -> None:
        out.publish.append((p.SYSTEM_TOPIC, p.Notice(event="shutdown", boot=self.boot, ts=now + self.wall_offset)))
