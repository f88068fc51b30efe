"""The broker's state machine, sans I/O: rooms, members, sessions, presence,
sequence numbers, dedup and rate limits.

The asyncio shell (zchat.broker) feeds it decoded bodies, the authenticated user
name (from ZAP's User-Id, never from a payload) and the time; the core fills an
``Outcome`` with what to store, publish and reply. It never touches a socket, a clock
or storage, so tests drive it with plain values.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Iterable

from zchat import protocol as p
from zchat.protocol import ErrorCode as E

DEDUP_CAPACITY = 10_000  # cids remembered per user

# Core.send reads these as module globals: cheaper than an attribute of ``p`` per line.
_MAX_CID_LEN = p.MAX_CID_LEN
_Msg = p.Msg
_Stored = p.Stored
_HEX2 = [f"{i:02x}" for i in range(256)]  # the last two hex digits of a message id


def valid_sid(sid: str) -> bool:
    """Whether ``sid`` could be a session id this broker gave out."""
    return 0 < len(sid) <= _MAX_CID_LEN and sid.isascii()


def _ack(acks: dict[str, list[p.Stored]], sid: str, stored: p.Stored) -> None:
    """Append to ``acks[sid]`` without building a throwaway list as setdefault would."""
    items = acks.get(sid)
    if items is None:
        acks[sid] = [stored]
    else:
        items.append(stored)


class RecentCids(dict):  # type: ignore[type-arg]
    """One user's remembered cid -> Stored, oldest first, with the same cids in ``order``.

    A plain dict plus a deque beside it: ``popleft`` finds the oldest cheaply, whereas
    ``del d[next(iter(d))]`` on a full dict gets slower and slower (each call walks over
    the dead slots earlier deletions left at its front: ~4 us a line at 10,000 cids),
    and an OrderedDict costs about twice as much per insert and eviction.
    """

    __slots__ = ("order",)

    def __init__(self) -> None:
        super().__init__()
        self.order: deque[str] = deque()

    def add_new(self, cid: str, stored: p.Stored) -> None:
        """Remember ``cid``, which is not remembered yet; forget the oldest beyond capacity."""
        self[cid] = stored
        order = self.order
        order.append(cid)
        if len(order) > DEDUP_CAPACITY:
            del self[order.popleft()]


class Dedup:
    """The last DEDUP_CAPACITY (user, cid) -> Stored of each user.

    Per user so that a chatty user cannot push a quiet user's cids out before the
    quiet user's client had a chance to resend.
    """

    def __init__(self) -> None:
        self.by_user: dict[str, RecentCids] = {}

    def get(self, key: tuple[str, str]) -> p.Stored | None:
        cids = self.by_user.get(key[0])
        return None if cids is None else cids.get(key[1])

    def of(self, user: str) -> RecentCids:
        cids = self.by_user.get(user)
        if cids is None:
            cids = self.by_user[user] = RecentCids()
        return cids

    def add(self, user: str, stored: p.Stored) -> None:
        cids = self.of(user)
        if stored.cid in cids:  # a known cid keeps its place, as in an OrderedDict (only the warm-up can do this)
            cids[stored.cid] = stored
        else:
            cids.add_new(stored.cid, stored)

    def forget(self, user: str, cid: str) -> None:
        cids = self.by_user.get(user)
        if cids is not None and cids.pop(cid, None) is not None:
            order = cids.order
            # Forgotten cids are the newest (of a batch storage refused): look from the end.
            for i, known in enumerate(reversed(order), 1):
                if known == cid:
                    del order[-i]
                    break

    def __contains__(self, key: tuple[str, str]) -> bool:
        return self.get(key) is not None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return ((user, cid) for user, cids in self.by_user.items() for cid in cids)

    def __len__(self) -> int:
        return sum(len(cids) for cids in self.by_user.values())


@dataclasses.dataclass(frozen=True)
class Limits:
    heartbeat: float = 10.0  # seconds between client pings
    rate: float = 20.0  # messages/second per user; 0 disables the limit
    burst: float = 100.0
    max_bytes: int = p.MAX_MESSAGE_BYTES
    pull_port: int = 0
    pub_port: int = 0
    pub_hwm: int = 100_000  # per-subscriber queue on the broker before PUB drops

    @property
    def presence_timeout(self) -> float:
        """A session unheard of for this long is gone: three missed heartbeats."""
        return 3 * self.heartbeat


@dataclasses.dataclass(frozen=True)
class HistoryQuery:
    """A history request the core has authorised; the shell runs it against storage."""

    sid: str
    request: p.History
    head: int


@dataclasses.dataclass
class Outcome:
    """What the shell must do, in this order: store, persist members, publish, reply."""

    store: list[p.Msg] = dataclasses.field(default_factory=list)
    members: list[tuple[str, str, bool]] = dataclasses.field(default_factory=list)
    publish: list[tuple[bytes, p.Msg | p.Presence | p.Notice]] = dataclasses.field(default_factory=list)
    replies: list[tuple[str, p.Reply]] = dataclasses.field(default_factory=list)
    acks: dict[str, list[p.Stored]] = dataclasses.field(default_factory=dict)
    queries: list[HistoryQuery] = dataclasses.field(default_factory=list)

    def error(self, sid: str, code: str, message: str, *, rid: int = 0, cid: str = "", retry_after: float = 0.0) -> None:
        self.replies.append((sid, p.Error(code=code, message=message, rid=rid, cid=cid, retry_after=retry_after)))


@dataclasses.dataclass(slots=True)
class Session:
    sid: str
    name: str
    last_seen: float
    # Whether chat lines may name this session: checked once here, not per line in send.
    sid_ok: bool = dataclasses.field(init=False, repr=False, compare=False)
    # The user's state that send needs, shared by all of the user's sessions and held
    # here to spare a lookup by name per line: their window in Core.dedup and their
    # bucket in Core.buckets (never replaced once made), taken by send when it finds them.
    recent: RecentCids | None = dataclasses.field(default=None, repr=False, compare=False)
    bucket: TokenBucket | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.sid_ok = valid_sid(self.sid)


class TokenBucket:
    """Refills ``rate`` tokens a second up to ``burst``; one token per message."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now

    def take(self, rate: float, burst: float, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one is available."""
        tokens = self.tokens + (now - self.stamp) * rate
        if not tokens < burst:  # min(burst, tokens), without the call (and as min treats NaN)
            tokens = burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / rate


class Core:
    def __init__(
        self,
        *,
        epoch: str,
        boot: str,
        limits: Limits = Limits(),
        heads: dict[str, int] | None = None,
        members: dict[str, set[str]] | None = None,
        users: Iterable[str] = (),
        recent: Iterable[p.Msg] = (),
        id_prefix: str = "",
    ) -> None:
        self.epoch = epoch
        self.boot = boot
        self.limits = limits
        self.heads: dict[str, int] = dict(heads or {})
        self.members: dict[str, set[str]] = {room: set(names) for room, names in (members or {}).items() if names}
        self.rooms_of: dict[str, set[str]] = {}
        for room, names in self.members.items():
            for name in names:
                self.rooms_of.setdefault(name, set()).add(room)
        self.users: set[str] = set(users) | set(self.rooms_of)
        self.sessions: dict[str, Session] = {}
        self.devices: dict[str, set[str]] = {}  # name -> live session ids
        self.buckets: dict[str, TokenBucket] = {}
        self.dedup = Dedup()
        for msg in recent:
            if msg.cid:
                self._remember(msg.sender, msg)
        self.id_prefix = id_prefix  # message ids are id_prefix + counter in hex
        self.counter = 0
        self.topics: dict[str, bytes] = {}  # room -> topic frame, made once
        # sender -> to -> (DM room, inbox topics), made on the first good line between them
        self.dms: dict[str, dict[str, tuple[str, tuple[bytes, ...]]]] = {}
        self.counters: dict[str, int] = {}
        self._wait_texts: dict[float, str] = {}  # retry_after -> the rate_limited message, recently used

    # ------------------------------------------------------------ queries

    def online(self, name: str) -> bool:
        return bool(self.devices.get(name))

    def member_list(self, room: str) -> list[p.Member]:
        return [p.Member(name, self.online(name)) for name in sorted(self.members.get(room, ()))]

    def heads_of(self, name: str) -> dict[str, int]:
        return {room: self.heads.get(room, 0) for room in self.rooms_of.get(name, ())}

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # ------------------------------------------------------------ auth & subscriptions

    def add_user(self, name: str) -> None:
        """A name was claimed at the handshake (the shell stored its digest)."""
        self.users.add(name)

    def may_subscribe(self, name: str, topic: bytes) -> bool:
        """Whether ``name`` may receive ``topic``: own inbox, rooms it is in, the system topic.

        Only exact topics pass: a bare prefix such as ``@`` or ``#de`` would let ZeroMQ's
        prefix match deliver other people's traffic.
        """
        parsed = p.parse_topic(topic)
        if parsed is None:
            return False
        kind, target = parsed
        if kind == "system":
            return True
        if kind == "inbox":
            return target == name
        return name in self.members.get(target, ())

    # ------------------------------------------------------------ sessions

    def hello(self, sid: str, name: str, req: p.Hello, now: float, out: Outcome) -> None:
        session = self.sessions.get(sid)
        if session is not None and session.name != name:
            self.count("session_spoof")
            out.error(sid, E.NO_SESSION, "that session id belongs to another user", rid=req.rid)
            return
        self.users.add(name)
        if session is None:
            self._open_session(sid, name, now, out)
        else:
            session.last_seen = now
        lim = self.limits
        out.replies.append(
            (
                sid,
                p.Welcome(
                    rid=req.rid, name=name, epoch=self.epoch, boot=self.boot,
                    pull_port=lim.pull_port, pub_port=lim.pub_port, heartbeat=lim.heartbeat,
                    max_bytes=lim.max_bytes, rate=lim.rate, burst=lim.burst,
                    rooms=self.heads_of(name),
                ),
            )
        )

    def _open_session(self, sid: str, name: str, now: float, out: Outcome) -> None:
        self.sessions[sid] = Session(sid, name, now)
        devices = self.devices.setdefault(name, set())
        devices.add(sid)
        if len(devices) == 1:
            self._announce(name, True, now, out)

    def _close_session(self, sid: str, now: float, out: Outcome) -> None:
        session = self.sessions.pop(sid)
        devices = self.devices.get(session.name, set())
        devices.discard(sid)
        if not devices:
            self.devices.pop(session.name, None)
            self._announce(session.name, False, now, out)

    def _announce(self, name: str, online: bool, now: float, out: Outcome) -> None:
        for room in sorted(self.rooms_of.get(name, ())):
            if not p.is_dm_room(room):
                out.publish.append((p.room_topic(room), p.Presence(room=room, name=name, online=online, ts=now)))

    def tick(self, now: float, out: Outcome) -> None:
        """Expire sessions that missed their heartbeats: their users go offline."""
        deadline = now - self.limits.presence_timeout
        for sid in [s.sid for s in self.sessions.values() if s.last_seen < deadline]:
            self.count("session_expired")
            self._close_session(sid, now, out)

    def _session(self, sid: str, name: str, rid: int, now: float, out: Outcome) -> Session | None:
        session = self.sessions.get(sid)
        if session is None or session.name != name:
            out.error(sid, E.NO_SESSION, "no session: send hello first", rid=rid)
            return None
        session.last_seen = now
        return session

    # ------------------------------------------------------------ requests

    def request(self, sid: str, name: str, req: p.Request, now: float, out: Outcome) -> None:
        """Handle one DEALER request from ``sid``, authenticated as ``name``."""
        if isinstance(req, p.Hello):
            self.hello(sid, name, req, now, out)
            return
        if self._session(sid, name, req.rid, now, out) is None:
            return
        if isinstance(req, p.Ping):
            out.replies.append((sid, p.Pong(rid=req.rid, boot=self.boot, epoch=self.epoch, heads=self.heads_of(name))))
        elif isinstance(req, p.Join):
            self._join(sid, name, req, now, out)
        elif isinstance(req, p.Part):
            self._part(sid, name, req, now, out)
        elif isinstance(req, p.History):
            self._history(sid, name, req, out)
        elif isinstance(req, p.Who):
            if self._readable(sid, name, req.room, req.rid, out):
                out.replies.append((sid, p.WhoReply(rid=req.rid, room=req.room, members=self.member_list(req.room))))
        elif isinstance(req, p.Rooms):
            out.replies.append((sid, p.RoomsReply(rid=req.rid, rooms=self.room_list())))
        elif isinstance(req, p.Bye):
            self._close_session(sid, now, out)
            out.replies.append((sid, p.Ok(rid=req.rid)))

    def room_list(self) -> list[p.RoomInfo]:
        return [
            p.RoomInfo(room, len(names), sum(1 for n in names if self.online(n)))
            for room, names in sorted(self.members.items())
            if not p.is_dm_room(room)
        ]

    def _join(self, sid: str, name: str, req: p.Join, now: float, out: Outcome) -> None:
        if not p.valid_room(req.room):
            out.error(sid, E.BAD_ROOM, f"bad room name {req.room!r}: use a-z, 0-9, '_', '-', '.' (max {p.MAX_ROOM_LEN})", rid=req.rid)
            return
        if name not in self.members.get(req.room, ()):
            self._set_member(req.room, name, True, out)
            self._sequence(req.room, name, "", "join", "", "", now, out, p.room_topic(req.room))
        out.replies.append(
            (sid, p.Joined(rid=req.rid, room=req.room, head=self.heads.get(req.room, 0), epoch=self.epoch, members=self.member_list(req.room)))
        )

    def _part(self, sid: str, name: str, req: p.Part, now: float, out: Outcome) -> None:
        if name not in self.members.get(req.room, ()):
            out.error(sid, E.NOT_MEMBER, f"you are not in {req.room!r}", rid=req.rid)
            return
        if not p.is_dm_room(req.room):
            self._sequence(req.room, name, "", "part", "", "", now, out, p.room_topic(req.room))
        self._set_member(req.room, name, False, out)
        out.replies.append((sid, p.Ok(rid=req.rid)))

    def _set_member(self, room: str, name: str, member: bool, out: Outcome) -> None:
        if member:
            self.members.setdefault(room, set()).add(name)
            self.rooms_of.setdefault(name, set()).add(room)
        else:
            self.members.get(room, set()).discard(name)
            if not self.members.get(room):
                self.members.pop(room, None)
            self.rooms_of.get(name, set()).discard(room)
        out.members.append((room, name, member))

    def _readable(self, sid: str, name: str, room: str, rid: int, out: Outcome) -> bool:
        """Public rooms are readable by anyone; a DM conversation only by its two users."""
        peers = p.dm_peers(room)
        if peers is not None:
            if name not in peers:
                out.error(sid, E.NOT_MEMBER, "that conversation is not yours", rid=rid)
                return False
        elif not p.valid_room(room):
            out.error(sid, E.BAD_ROOM, f"bad room name {room!r}", rid=rid)
            return False
        if room not in self.members and room not in self.heads:
            out.error(sid, E.UNKNOWN_ROOM, f"no room {room!r}", rid=rid)
            return False
        return True

    def _history(self, sid: str, name: str, req: p.History, out: Outcome) -> None:
        if not self._readable(sid, name, req.room, req.rid, out):
            return
        if not 1 <= req.limit <= p.MAX_HISTORY:
            out.error(sid, E.BAD_REQUEST, f"limit must be 1..{p.MAX_HISTORY}", rid=req.rid)
            return
        out.queries.append(HistoryQuery(sid, req, self.heads.get(req.room, 0)))

    # ------------------------------------------------------------ chat lines

    def send(self, name: str, msg: p.Send, now: float, out: Outcome) -> None:
        """Handle one PUSHed chat line from ``name``; errors and acks go to ``msg.sid``.

        The broker's hot path, run once per chat line: attributes are read into locals
        once, and message sequencing is done here rather than in ``_sequence``.
        """
        sid = msg.sid
        cid = msg.cid
        session = self.sessions.get(sid)
        if session is None or session.name != name or not session.sid_ok:
            if not valid_sid(sid):
                self.count("bad_sid")  # not a session id this broker could have given
            else:
                self.count("no_session")
                if session is None:  # a real client re-hellos on this; a spoofed sid is dropped
                    out.error(sid, E.NO_SESSION, "no session: send hello first", cid=cid)
            return
        session.last_seen = now
        if not 0 < len(cid) <= _MAX_CID_LEN:
            out.error(sid, E.BAD_REQUEST, f"cid must be 1..{_MAX_CID_LEN} characters", cid=cid[:_MAX_CID_LEN])
            return
        cids = session.recent
        if cids is None:  # the user may have no window yet either: Core.dedup makes it on the first line
            cids = session.recent = self.dedup.by_user.get(name)
        if cids is not None:
            seen = cids.get(cid)
            if seen is not None:
                self.count("duplicate")
                _ack(out.acks, sid, seen)
                return
        text = msg.text
        if not text or text.isspace():
            out.error(sid, E.BAD_REQUEST, "empty message", cid=cid)
            return
        room = msg.room
        to = msg.to
        if room:
            if to:
                out.error(sid, E.BAD_REQUEST, "give exactly one of room and to", cid=cid)
                return
            members = self.members.get(room)  # a room with members has a valid name
            topic = self.topics.get(room)  # only public rooms get one, so it spares the "@" test
            if members is None or topic is None:
                if members is None or room[0] == "@":  # DM conversations are reached with `to`
                    if not p.valid_room(room):
                        out.error(sid, E.BAD_ROOM, f"bad room name {room!r}", cid=cid)
                    else:
                        out.error(sid, E.UNKNOWN_ROOM, f"no room {room!r}: join it first", cid=cid)
                    return
                topic = self.topics[room] = p.room_topic(room)
            if name not in members:
                out.error(sid, E.NOT_MEMBER, f"join {room!r} before sending to it", cid=cid)
                return
        elif not to:
            out.error(sid, E.BAD_REQUEST, "give exactly one of room and to", cid=cid)
            return
        else:
            peers = self.dms.get(name)
            dm = None if peers is None else peers.get(to)
            if dm is None:  # first line of this sender to this user: check `to` once
                if not p.valid_name(to):
                    out.error(sid, E.BAD_NAME, f"bad user name {to!r}", cid=cid)
                    return
                if to not in self.users:  # users are never removed, so a good pair stays good
                    out.error(sid, E.UNKNOWN_USER, f"no user {to!r}", cid=cid)
                    return
                topics = tuple(dict.fromkeys((p.inbox_topic(name), p.inbox_topic(to))))  # once if to == name
                dm = self.dms.setdefault(name, {})[to] = (p.dm_room(name, to), topics)
            room, topics = dm
        rate = self.limits.rate
        if rate > 0:
            bucket = session.bucket
            burst = self.limits.burst
            if bucket is None:
                bucket = self.buckets.get(name)
                if bucket is None:
                    bucket = self.buckets[name] = TokenBucket(burst, now)
                session.bucket = bucket
            wait = bucket.take(rate, burst, now)
            if wait:
                self._rate_limited(sid, cid, wait, out)
                return
        if to:  # a DM conversation exists from its first message
            members = self.members.get(room)
            if members is None or name not in members or to not in members:
                for member in (name, to):
                    if member not in self.members.get(room, ()):
                        self._set_member(room, member, True, out)
        # _sequence, inline
        heads = self.heads
        seq = heads[room] = heads.get(room, 0) + 1
        self.counter = counter = self.counter + 1
        if counter >> 8 == self._id_high:  # self._id(counter), inline
            mid = self._id_base + _HEX2[counter & 0xFF]
        else:
            mid = self._id(counter)
        # Positional arguments are faster than keywords; test_core checks the field order:
        # Msg(room, seq, id, ts, sender, text, kind, to, cid, epoch)
        line = _Msg(room, seq, mid, now, name, text, "me" if msg.me else "text", to, cid, self.epoch)
        out.store.append(line)
        if to:
            publish = out.publish  # unrolled: faster than a loop over topics
            publish.append((topics[0], line))
            if len(topics) > 1:
                publish.append((topics[1], line))
        else:
            out.publish.append((topic, line))
        stored = _Stored(cid, room, seq, mid, now)
        if cids is None:
            cids = session.recent = self.dedup.of(name)
        cids[cid] = stored  # RecentCids.add_new, inline
        order = cids.order
        order.append(cid)
        if len(order) > DEDUP_CAPACITY:
            del cids[order.popleft()]
        acks = out.acks.get(sid)  # not setdefault: that builds a list to throw away
        if acks is None:
            out.acks[sid] = [stored]
        else:
            acks.append(stored)

    def _rate_limited(self, sid: str, cid: str, wait: float, out: Outcome) -> None:
        """Refuse a line over the rate limit: this runs for every line of a flood."""
        counters = self.counters
        counters["rate_limited"] = counters.get("rate_limited", 0) + 1
        # Lines of one turn share `now`, so a flood is refused with few distinct waits,
        # and formatting a float costs more than the rest of the refusal.
        message = self._wait_texts.get(wait)
        if message is None:
            if len(self._wait_texts) >= 1024:
                self._wait_texts.clear()
            message = self._wait_texts[wait] = f"slow down: try again in {wait:.2f}s"
        out.replies.append((sid, p.Error(code=E.RATE_LIMITED, message=message, cid=cid, retry_after=wait)))

    def _id(self, counter: int) -> str:
        """``f"{id_prefix}{counter:x}"``, made faster: the prefix and all but the last two
        hex digits are formatted once per block of 256 ids (send inlines the fast case)."""
        high = counter >> 8
        if high != self._id_high:
            if not high:  # below 0x100 the last two digits are not zero-padded
                return f"{self._id_prefix}{counter:x}"
            self._id_high = high
            self._id_base = f"{self._id_prefix}{high:x}"
        return self._id_base + _HEX2[counter & 0xFF]

    @property
    def id_prefix(self) -> str:
        return self._id_prefix

    @id_prefix.setter
    def id_prefix(self, prefix: str) -> None:
        self._id_prefix = prefix
        self._id_high = -1  # no block formatted yet
        self._id_base = ""

    def _sequence(
        self, room: str, sender: str, text: str, kind: p.MsgKind, to: str, cid: str, now: float, out: Outcome, *topics: bytes
    ) -> p.Stored:
        seq = self.heads.get(room, 0) + 1
        self.heads[room] = seq
        self.counter += 1
        msg = p.Msg(
            room=room, seq=seq, id=self._id(self.counter), ts=now, sender=sender,
            text=text, kind=kind, to=to, cid=cid, epoch=self.epoch,
        )
        out.store.append(msg)
        for topic in topics:
            out.publish.append((topic, msg))
        return self._remember(sender, msg) if cid else p.Stored(cid, room, seq, msg.id, now)

    def _remember(self, sender: str, msg: p.Msg) -> p.Stored:
        stored = p.Stored(msg.cid, msg.room, msg.seq, msg.id, msg.ts)
        self.dedup.add(sender, stored)
        return stored

    def forget(self, failed: Iterable[p.Msg]) -> None:
        """Storage refused a batch: forget its cids so resends are taken afresh.

        Heads stay where they are: replies of that batch may already carry them, and
        reusing a seq would let a client take a new message for one it has seen. The
        hole is reported to clients as a Gap (not in history).
        """
        for msg in failed:
            if msg.cid:
                self.dedup.forget(msg.sender, msg.cid)

    def shutdown(self, now: float, out: Outcome) -> None:
        out.publish.append((p.SYSTEM_TOPIC, p.Notice(event="shutdown", boot=self.boot, ts=now)))
