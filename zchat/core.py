"""The broker's state machine, sans I/O: rooms, members, sessions, presence,
sequence numbers, dedup and rate limits.

The asyncio shell (zchat.broker) feeds it decoded bodies, the authenticated user
name (from ZAP's User-Id, never from a payload) and the time; the core fills an
``Outcome`` with what to store, publish and reply. It never touches a socket, a clock
or storage, so tests drive it with plain values.
"""

from __future__ import annotations

import dataclasses
import logging
from bisect import bisect_left, bisect_right, insort
from collections import deque
from typing import Iterable

import msgspec

from zchat import protocol as p
from zchat.protocol import ErrorCode as E

log = logging.getLogger(__name__)

# Core.send reads these as module globals: cheaper than an attribute of ``p`` per line.
_MAX_CID_LEN = p.MAX_CID_LEN
_Msg = p.Msg
_Stored = p.Stored
_HEX2 = [f"{i:02x}" for i in range(256)]  # the last two hex digits of a message id
_LOOKER = p.LOOKER

# Upper bounds of the encoded size of one list item (a msgpack map: keys, headers and
# the largest ints), plus the name's bytes: pages are cut to fit MAX_REPLY_BYTES.
_MEMBER_BYTES = 24
_ROOMINFO_BYTES = 48
_REPLY_SLACK = 1024  # the reply's own fields (rid, room, more, tags)


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


class _Entry(msgspec.Struct, gc=False):
    """One remembered cid: when (monotonic), whose, its Stored, and whether it is gone.

    Held in its user's window and in Dedup.order at once; an entry its user's cap or a
    forget removed is only marked dead there, and skipped or compacted away later.
    Never tracked by the garbage collector (it holds only strings, a float, a bool and
    an untracked Stored): 100,000 tracked tuples made collections cost Core.send more
    than a microsecond a line.
    """

    now: float
    user: str
    stored: p.Stored
    dead: bool = False


class RecentCids(dict):  # type: ignore[type-arg]
    """One user's remembered cid -> Stored, with its entries oldest first in ``order``.

    A plain dict plus a deque beside it: ``popleft`` finds the oldest cheaply, whereas
    ``del d[next(iter(d))]`` on a full dict gets slower and slower (each call walks over
    the dead slots earlier deletions left at its front: ~4 us a line at 10,000 cids),
    and an OrderedDict costs about twice as much per insert and eviction.
    """

    __slots__ = ("order", "user")

    def __init__(self, user: str = "") -> None:
        super().__init__()
        self.order: deque[_Entry] = deque()
        self.user = user

    def drop(self, cid: str) -> None:
        """Forget ``cid`` (remembered) and mark its entry dead: from the front of
        ``order`` if it is the oldest, else from the back (a batch storage refused holds
        the newest)."""
        del self[cid]
        order = self.order
        if order[0].stored.cid == cid:
            order.popleft().dead = True
            return
        for i in range(len(order) - 1, -1, -1):
            entry = order[i]
            if entry.stored.cid == cid:
                entry.dead = True
                del order[i]
                return


class Dedup:
    """Remembered (user, cid) -> Stored: at most ``per_user`` per user, ``total`` in all,
    and entries older than ``window`` seconds go at the next ticks; oldest first.

    Per user so that a chatty user cannot push a quiet user's cids out before the
    quiet user's client had a chance to resend; in total so that many throwaway names
    cannot each keep a full window. ``order`` holds every entry, oldest first; the dead
    ones (``stale`` of them) do not count against ``total`` and are compacted away once
    they are most of it, so each entry is copied O(1) times on average.
    """

    def __init__(self, per_user: int = 1_000, total: int = 100_000, window: float = 900.0) -> None:
        self.per_user = per_user
        self.total = total
        self.window = window
        self.by_user: dict[str, RecentCids] = {}
        self.order: deque[_Entry] = deque()
        self.stale = 0
        # Core.send calls trim once ``order`` is longer than this: total + stale as of
        # the last trim, so live entries never exceed total (stale ones only grow).
        self.high = total

    def get(self, key: tuple[str, str]) -> p.Stored | None:
        cids = self.by_user.get(key[0])
        return None if cids is None else cids.get(key[1])

    def of(self, user: str) -> RecentCids:
        cids = self.by_user.get(user)
        if cids is None:
            cids = self.by_user[user] = RecentCids(user)
        return cids

    def add(self, user: str, stored: p.Stored, now: float) -> None:
        """Remember ``stored`` as of monotonic time ``now`` (Core.send inlines this)."""
        cids = self.of(user)
        cid = stored.cid
        if cid in cids:  # seen again (only the warm-up can do this): now the newest
            cids.drop(cid)
            self.stale += 1
        entry = _Entry(now, user, stored)
        cids[cid] = stored
        order = cids.order
        order.append(entry)
        if len(order) > self.per_user:
            old = order.popleft()
            del cids[old.stored.cid]
            old.dead = True
            self.stale += 1
        self.order.append(entry)
        if len(self.order) > self.high:
            self.trim()

    def trim(self) -> None:
        """Hold live entries to ``total`` (oldest go first); compact ``order`` once most
        of it is dead."""
        order = self.order
        if self.stale > len(order) // 2:
            self.order = order = deque([entry for entry in order if not entry.dead])
            self.stale = 0
        while len(order) - self.stale > self.total:
            self.evict_oldest()
        self.high = self.total + self.stale

    def evict_oldest(self) -> None:
        """Drop the front of ``order``, and forget its cid if it is still remembered."""
        entry = self.order.popleft()
        if entry.dead:
            self.stale -= 1
            return
        cids = self.by_user[entry.user]
        del cids[entry.stored.cid]
        entry.dead = True
        order = cids.order
        if order[0] is entry:  # the oldest of its user too, but for warm-up re-adds
            order.popleft()
        else:
            for i, known in enumerate(order):
                if known is entry:
                    del order[i]
                    break

    def expire(self, now: float, budget: int) -> int:
        """Drop entries older than the window, looking at most at ``budget``; return how
        many were looked at."""
        order = self.order
        deadline = now - self.window
        done = 0
        while order and done < budget and order[0].now < deadline:
            self.evict_oldest()
            done += 1
        return done

    def forget(self, user: str, cid: str, id: str = "") -> bool:
        """Forget ``user``'s ``cid`` (only if it names message ``id``, when given)."""
        cids = self.by_user.get(user)
        if cids is None:
            return False
        stored = cids.get(cid)
        if stored is None or (id and stored.id != id):
            return False
        cids.drop(cid)
        self.stale += 1
        return True

    def __contains__(self, key: tuple[str, str]) -> bool:
        return self.get(key) is not None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return ((user, entry.stored.cid) for user, cids in self.by_user.items() for entry in cids.order)

    def __len__(self) -> int:
        return sum(len(cids) for cids in self.by_user.values())


@dataclasses.dataclass(frozen=True)
class Limits:
    heartbeat: float = 10.0  # seconds between client pings
    rate: float = 20.0  # chat (and join/part) lines/second per user; 0 disables the limit
    burst: float = 100.0
    max_bytes: int = p.MAX_MESSAGE_BYTES
    pull_port: int = 0
    pub_port: int = 0
    pub_hwm: int = 100_000  # per-subscriber queue on the broker before PUB drops
    # Requests (hello, join, part, history, who, rooms, ping, bye) per second per user
    # name; 0 disables (and so does rate=0, as for room_rate). A client's heartbeat is one per 10 s; a reconnect with many rooms
    # is a hello plus a join and a history page or two per room: the burst covers that.
    request_rate: float = 10.0
    request_burst: float = 100.0
    # Stored lines per second per public room, over all senders; 0 disables. Far above
    # what people type (a room of 1,000 active people at 1 line/5 s is 200/s).
    room_rate: float = 200.0
    room_burst: float = 1000.0
    max_rooms: int = 500  # rooms and DM conversations per user
    page_size: int = 500  # most members/rooms in one who/rooms reply
    dedup_per_user: int = 1_000  # cids remembered per user
    dedup_total: int = 100_000  # cids remembered over all users
    dedup_window: float = 900.0  # seconds a cid is surely remembered for (if the caps allow)
    sweep: int = 1_000  # most idle users/rooms/cids looked at per tick

    def effective(self) -> Limits:
        """These limits as the core applies them: ``rate`` 0 turns every rate limit off
        (requests and rooms too: a trusted deployment, a benchmark)."""
        if self.rate > 0:
            return self
        return dataclasses.replace(self, request_rate=0.0, room_rate=0.0)

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
    """What the shell must do, in this order: store, persist members, publish, reply.

    If storing ``store`` fails, the shell calls ``Core.undo(outcome)`` and then carries
    out what is left (undo rewrites it).
    """

    store: list[p.Msg] = dataclasses.field(default_factory=list)
    members: list[tuple[str, str, bool]] = dataclasses.field(default_factory=list)
    publish: list[tuple[bytes, p.Msg | p.Presence | p.Notice]] = dataclasses.field(default_factory=list)
    replies: list[tuple[str, p.Reply]] = dataclasses.field(default_factory=list)
    acks: dict[str, list[p.Stored]] = dataclasses.field(default_factory=dict)
    queries: list[HistoryQuery] = dataclasses.field(default_factory=list)
    # Indexes into ``replies`` of the replies to joins and parts that changed membership:
    # undo turns them into errors.
    changed: list[int] = dataclasses.field(default_factory=list)

    def error(self, sid: str, code: str, message: str, *, rid: int = 0, cid: str = "", retry_after: float = 0.0) -> None:
        self.replies.append((sid, p.Error(code=code, message=message, rid=rid, cid=cid, retry_after=retry_after)))


@dataclasses.dataclass(slots=True)
class Session:
    sid: str
    name: str
    last_seen: float
    # Whether chat lines may name this session: checked once here, not per line in send
    # (False for a look-only session too: send then refuses it off the hot path).
    sid_ok: bool = dataclasses.field(init=False, repr=False, compare=False)
    # The user's state that send needs, shared by all of the user's sessions and held
    # here to spare a lookup by name per line: their window in Core.dedup and their
    # bucket in Core.buckets (never replaced while the user has a session), taken by send
    # when it finds them.
    recent: RecentCids | None = dataclasses.field(default=None, repr=False, compare=False)
    bucket: TokenBucket | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.sid_ok = valid_sid(self.sid) and self.name != _LOOKER


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

    def full(self, rate: float, burst: float, now: float) -> bool:
        """Whether it has refilled: then dropping it changes nothing."""
        return rate <= 0 or self.tokens + (now - self.stamp) * rate >= burst


class Core:
    """The broker's state. Every ``now`` it is given is MONOTONIC seconds (rate buckets,
    presence, dedup windows); timestamps on the wire are ``now + wall_offset``, which the
    shell keeps at ``time.time() - time.monotonic()`` (0.0 in tests: ts == now)."""

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
        wall_offset: float = 0.0,
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
        self.buckets: dict[str, TokenBucket] = {}  # name -> chat line bucket
        self.request_buckets: dict[str, TokenBucket] = {}  # name -> request bucket
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
        self.topics: dict[str, bytes] = {}  # room -> topic frame, made once
        # sender -> to -> (DM room, inbox topics), made on the first good line between them
        self.dms: dict[str, dict[str, tuple[str, tuple[bytes, ...]]]] = {}
        self.counters: dict[str, int] = {}
        self._wait_texts: dict[float, str] = {}  # retry_after -> the rate_limited message, recently used

    # ------------------------------------------------------------ queries

    def online(self, name: str) -> bool:
        return bool(self.devices.get(name))

    def member_list(self, room: str) -> list[p.Member]:
        """Every member of ``room``, by name (tests and small rooms; replies use member_page)."""
        return [p.Member(name, self.online(name)) for name in sorted(self.members.get(room, ()))]

    def member_page(self, room: str, after: str = "") -> tuple[list[p.Member], bool]:
        """Members of ``room`` named after ``after``: at most a page and MAX_REPLY_BYTES;
        and whether more follow. The room's sorted list is kept once made."""
        index = self._member_index.get(room)
        if index is None:
            names = self.members.get(room)
            if not names:
                return [], False
            index = self._member_index[room] = sorted(names)  # kept while the room has members
        start = bisect_right(index, after) if after else 0
        devices = self.devices
        page: list[p.Member] = []
        budget = p.MAX_REPLY_BYTES - _REPLY_SLACK
        for name in index[start:start + self.limits.page_size]:
            budget -= len(name) + _MEMBER_BYTES  # names are ASCII
            if budget < 0:
                break
            page.append(p.Member(name, bool(devices.get(name))))
        return page, start + len(page) < len(index)

    def room_page(self, after: str = "") -> tuple[list[p.RoomInfo], bool]:
        """Public rooms named after ``after``: at most a page and MAX_REPLY_BYTES; and
        whether more follow. Paged from a sorted index with bisect: no sort per request."""
        index = self.room_index
        start = bisect_right(index, after) if after else 0
        members, online_in = self.members, self.online_in
        page: list[p.RoomInfo] = []
        budget = p.MAX_REPLY_BYTES - _REPLY_SLACK
        for room in index[start:start + self.limits.page_size]:
            budget -= len(room) + _ROOMINFO_BYTES
            if budget < 0:
                break
            page.append(p.RoomInfo(room, len(members[room]), online_in.get(room, 0)))
        return page, start + len(page) < len(index)

    def room_list(self) -> list[p.RoomInfo]:
        """Every public room (tests; replies use room_page)."""
        return [p.RoomInfo(room, len(self.members[room]), self.online_in.get(room, 0)) for room in self.room_index]

    def heads_of(self, name: str) -> dict[str, int]:
        return {room: self.heads.get(room, 0) for room in self.rooms_of.get(name, ())}

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # ------------------------------------------------------------ auth & subscriptions

    def add_user(self, name: str) -> None:
        """A name was claimed at the handshake (the shell stored its digest)."""
        if name != _LOOKER:
            self.users.add(name)

    def release_user(self, name: str) -> None:
        """A claimed name was given up (the shell released it in storage): it is no
        user any more, and no cached DM pair may still reach it. O(senders): rare."""
        self.users.discard(name)
        self.dms.pop(name, None)
        for peers in self.dms.values():
            peers.pop(name, None)

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

    def subscribed(self, name: str, topic: bytes) -> p.Heads | None:
        """The Heads to publish on ``name``'s inbox once the shell has applied its
        authorised subscription to ``topic``: what was published before it took effect
        never reached the client, so it learns at once what to fetch from history.
        A room: that room's head; the inbox: heads of the user's DM conversations;
        the system topic (or anything else): None."""
        parsed = p.parse_topic(topic)
        if parsed is None:
            return None
        kind, target = parsed
        if kind == "room":
            return p.Heads(epoch=self.epoch, heads={target: self.heads.get(target, 0)})
        if kind == "inbox" and target == name:
            heads = self.heads
            return p.Heads(
                epoch=self.epoch,
                heads={room: heads.get(room, 0) for room in sorted(self.rooms_of.get(name, ())) if p.is_dm_room(room)},
            )
        return None

    # ------------------------------------------------------------ sessions

    def hello(self, sid: str, name: str, req: p.Hello, now: float, out: Outcome) -> None:
        session = self.sessions.get(sid)
        if session is not None and session.name != name:
            self.count("session_spoof")
            out.error(sid, E.NO_SESSION, "that session id belongs to another user", rid=req.rid)
            return
        looker = name == _LOOKER
        if session is None:
            if looker:  # never online, never announced, never a user
                self.sessions[sid] = Session(sid, name, now)
            else:
                self.users.add(name)
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
                    rooms={} if looker else self.heads_of(name),
                ),
            )
        )

    def _open_session(self, sid: str, name: str, now: float, out: Outcome) -> None:
        self.sessions[sid] = Session(sid, name, now)
        devices = self.devices.setdefault(name, set())
        devices.add(sid)
        if len(devices) == 1:
            self._went(name, True, now, out)

    def _close_session(self, sid: str, now: float, out: Outcome) -> None:
        session = self.sessions.pop(sid)
        if session.name == _LOOKER:
            return
        devices = self.devices.get(session.name, set())
        devices.discard(sid)
        if not devices:
            self.devices.pop(session.name, None)
            self._went(session.name, False, now, out)

    def _went(self, name: str, online: bool, now: float, out: Outcome) -> None:
        """``name`` came online or went offline: count it in its rooms and tell them.
        Bounded by the rooms cap (a user is in at most max_rooms rooms)."""
        online_in = self.online_in
        step = 1 if online else -1
        ts = now + self.wall_offset
        for room in sorted(self.rooms_of.get(name, ())):
            count = online_in.get(room, 0) + step
            if count > 0:
                online_in[room] = count
            else:
                online_in.pop(room, None)
            if not p.is_dm_room(room):
                out.publish.append((p.room_topic(room), p.Presence(room=room, name=name, online=online, ts=ts)))

    def tick(self, now: float, out: Outcome) -> None:
        """Expire sessions that missed their heartbeats (their users go offline), and
        evict a bounded amount of state nobody needs any more."""
        deadline = now - self.limits.presence_timeout
        for sid in [s.sid for s in self.sessions.values() if s.last_seen < deadline]:
            self.count("session_expired")
            self._close_session(sid, now, out)
        self.sweep(now)

    def sweep(self, now: float) -> None:
        """Evict, looking at most ``limits.sweep`` names, rooms and cids: dedup entries
        past their window; the buckets and DM cache of users without a session whose
        buckets have refilled (dropping a full bucket changes nothing); refilled room
        buckets."""
        lim = self.limits
        budget = lim.sweep
        self.dedup.expire(now, budget)
        users = self._sweep_users
        for _ in range(min(budget, len(users))):
            name = users.popleft()
            if name in self.devices or not self._evict_user(name, now):
                users.append(name)
            else:
                self._tracked.discard(name)
        rooms = self._sweep_rooms
        for _ in range(min(budget, len(rooms))):
            room = rooms.popleft()
            bucket = self.room_buckets.get(room)
            if bucket is not None and not bucket.full(lim.room_rate, lim.room_burst, now):
                rooms.append(room)
            else:
                self.room_buckets.pop(room, None)

    def _evict_user(self, name: str, now: float) -> bool:
        """Drop the per-user state of ``name`` (who has no session) if nothing is lost;
        whether all of it went."""
        lim = self.limits
        requests, lines = self.request_buckets.get(name), self.buckets.get(name)
        if requests is not None and not requests.full(lim.request_rate, lim.request_burst, now):
            return False
        if lines is not None and not lines.full(lim.rate, lim.burst, now):
            return False
        self.request_buckets.pop(name, None)
        self.buckets.pop(name, None)
        self.dms.pop(name, None)
        window = self.dedup.by_user.get(name)
        if window:
            return False  # its cids still count: look again later
        self.dedup.by_user.pop(name, None)
        return True

    def _track(self, name: str) -> None:
        if name not in self._tracked:
            self._tracked.add(name)
            self._sweep_users.append(name)

    def _session(self, sid: str, name: str, rid: int, now: float, out: Outcome) -> Session | None:
        session = self.sessions.get(sid)
        if session is None or session.name != name:
            out.error(sid, E.NO_SESSION, "no session: send hello first", rid=rid)
            return None
        session.last_seen = now
        return session

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
            out.replies.append((sid, p.Pong(rid=req.rid, boot=self.boot, epoch=self.epoch, heads=self.heads_of(name))))
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
        elif isinstance(req, p.Who):
            if self._readable(sid, name, req.room, req.rid, out):
                members, more = self.member_page(req.room, req.after)
                out.replies.append((sid, p.WhoReply(rid=req.rid, room=req.room, members=members, more=more)))
        elif isinstance(req, p.Rooms):
            rooms, more = self.room_page(req.after)
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
        return p.StatusReply(
            rid=rid, version="", boot=self.boot, epoch=self.epoch, uptime=0.0, storage="", storage_bytes=-1,
            sessions=len(self.sessions), users_online=len(self.devices), users=len(self.users),
            rooms=public, conversations=len(self.members) - public, messages=sum(self.heads.values()),
            limits=limits, counters=dict(self.counters),
        )

    def _line_budget(self, sid: str, name: str, room: str, now: float, out: Outcome, *, rid: int = 0, cid: str = "") -> bool:
        """Take a token for a stored line of ``name`` in public ``room``: the user's line
        bucket, then the room's (whose refusal gives the user's token back)."""
        lim = self.limits
        user_bucket = None
        if lim.rate > 0:
            user_bucket = self.buckets.get(name)
            if user_bucket is None:
                user_bucket = self.buckets[name] = TokenBucket(lim.burst, now)
                self._track(name)
            wait = user_bucket.take(lim.rate, lim.burst, now)
            if wait:
                self._rate_limited(sid, cid, wait, out, rid=rid)
                return False
        if lim.room_rate > 0 and not p.is_dm_room(room):
            room_bucket = self.room_buckets.get(room) or self._room_bucket(room, now)
            wait = room_bucket.take(lim.room_rate, lim.room_burst, now)
            if wait:
                if user_bucket is not None:
                    user_bucket.tokens += 1.0
                self._room_limited(sid, room, cid, wait, out, rid=rid)
                return False
        return True

    def _room_bucket(self, room: str, now: float) -> TokenBucket:
        bucket = self.room_buckets[room] = TokenBucket(self.limits.room_burst, now)
        self._sweep_rooms.append(room)
        return bucket

    def _room_limited(self, sid: str, room: str, cid: str, wait: float, out: Outcome, *, rid: int = 0) -> None:
        self.count("room_limited")
        out.error(sid, E.RATE_LIMITED, f"{room!r} is too busy: try again in {wait:.2f}s", rid=rid, cid=cid, retry_after=wait)

    def _room_cap(self, sid: str, name: str, out: Outcome, *, rid: int = 0, cid: str = "", whose: str = "") -> bool:
        """Whether ``name`` may be in one more room or conversation (max_rooms)."""
        cap = self.limits.max_rooms
        if len(self.rooms_of.get(name, ())) < cap:
            return True
        self.count("room_cap")
        if whose:
            message = f"{whose!r} is in {cap} rooms and conversations, the most allowed"
        else:
            message = f"you are in {cap} rooms and conversations, the most allowed: part one first"
        out.error(sid, E.LIMIT_REACHED, message, rid=rid, cid=cid)
        return False

    def _join(self, sid: str, name: str, req: p.Join, now: float, out: Outcome) -> None:
        if not p.valid_room(req.room):
            out.error(sid, E.BAD_ROOM, f"bad room name {req.room!r}: use a-z, 0-9, '_', '-', '.' (max {p.MAX_ROOM_LEN})", rid=req.rid)
            return
        changed = name not in self.members.get(req.room, ())
        if changed:
            if not self._room_cap(sid, name, out, rid=req.rid):
                return
            if not self._line_budget(sid, name, req.room, now, out, rid=req.rid):
                return
            self._set_member(req.room, name, True, out)
            self._sequence(req.room, name, "", "join", "", "", now, out, p.room_topic(req.room))
            out.changed.append(len(out.replies))
        members, _ = self.member_page(req.room)  # the first page: `who` pages on from its last name
        out.replies.append((sid, p.Joined(rid=req.rid, room=req.room, head=self.heads.get(req.room, 0), epoch=self.epoch, members=members)))

    def _part(self, sid: str, name: str, req: p.Part, now: float, out: Outcome) -> None:
        if name not in self.members.get(req.room, ()):
            out.error(sid, E.NOT_MEMBER, f"you are not in {req.room!r}", rid=req.rid)
            return
        if not p.is_dm_room(req.room):
            if not self._line_budget(sid, name, req.room, now, out, rid=req.rid):
                return
            self._sequence(req.room, name, "", "part", "", "", now, out, p.room_topic(req.room))
        self._set_member(req.room, name, False, out)
        out.changed.append(len(out.replies))
        out.replies.append((sid, p.Ok(rid=req.rid)))

    def _set_member(self, room: str, name: str, member: bool, out: Outcome) -> None:
        self._apply_member(room, name, member)
        out.members.append((room, name, member))

    def _apply_member(self, room: str, name: str, member: bool) -> None:
        """Change membership in memory with every index that follows it (a change, never
        a no-op: callers check first, and undo reverts changes in reverse order)."""
        online = name in self.devices
        index = self._member_index.get(room)
        if member:
            names = self.members.get(room)
            if names is None:
                names = self.members[room] = set()
                if not p.is_dm_room(room):
                    insort(self.room_index, room)
            names.add(name)
            self.rooms_of.setdefault(name, set()).add(room)
            if online:
                self.online_in[room] = self.online_in.get(room, 0) + 1
            if index is not None:
                insort(index, name)
        else:
            names = self.members.get(room, set())
            names.discard(name)
            if not names:
                self.members.pop(room, None)
                self._member_index.pop(room, None)
                index = None
                if not p.is_dm_room(room):
                    i = bisect_left(self.room_index, room)
                    if i < len(self.room_index) and self.room_index[i] == room:
                        del self.room_index[i]
            rooms = self.rooms_of.get(name)
            if rooms is not None:
                rooms.discard(room)
                if not rooms:
                    del self.rooms_of[name]
            if online:
                count = self.online_in.get(room, 0) - 1
                if count > 0:
                    self.online_in[room] = count
                else:
                    self.online_in.pop(room, None)
            if index is not None:
                i = bisect_left(index, name)
                if i < len(index) and index[i] == name:
                    del index[i]

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
            elif session is not None and session.name == name == _LOOKER:
                self.count("looker_send")
                out.error(sid, E.FORBIDDEN, "sign in with a name to send messages", cid=cid[:_MAX_CID_LEN])
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
        lim = self.limits
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
            new_dm = False
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
                if peers is None:
                    peers = self.dms[name] = {}
                elif len(peers) >= lim.max_rooms:  # a cache: bounded, and cheap to make again
                    peers.clear()
                dm = peers[to] = (p.dm_room(name, to), topics)
            room, topics = dm
            # A DM conversation exists from its first message: it counts as a room of both.
            members = self.members.get(room)
            new_dm = members is None or name not in members or to not in members
            if new_dm and not self._dm_cap(sid, name, to, room, cid, out):
                return
        rate = lim.rate
        if rate > 0:
            bucket = session.bucket
            burst = lim.burst
            if bucket is None:
                bucket = self.buckets.get(name)
                if bucket is None:
                    bucket = self.buckets[name] = TokenBucket(burst, now)
                session.bucket = bucket
            wait = bucket.take(rate, burst, now)
            if wait:
                self._rate_limited(sid, cid, wait, out)
                return
            if not to:  # (rate 0 turns the room budget off too: Limits.effective)
                room_rate = lim.room_rate
                if room_rate > 0:  # room_bucket.take(room_rate, lim.room_burst, now), inline
                    room_bucket = self.room_buckets.get(room)
                    if room_bucket is None:
                        room_bucket = self._room_bucket(room, now)
                    tokens = room_bucket.tokens + (now - room_bucket.stamp) * room_rate
                    room_burst = lim.room_burst
                    if not tokens < room_burst:
                        tokens = room_burst
                    room_bucket.stamp = now
                    if tokens >= 1.0:
                        room_bucket.tokens = tokens - 1.0
                    else:
                        room_bucket.tokens = tokens
                        bucket.tokens += 1.0  # the line was not taken: the user keeps the token
                        self._room_limited(sid, room, cid, (1.0 - tokens) / room_rate, out)
                        return
        if new_dm:
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
        ts = now + self.wall_offset
        # Positional arguments are faster than keywords; test_core checks the field order:
        # Msg(room, seq, id, ts, sender, text, kind, to, cid, epoch)
        line = _Msg(room, seq, mid, ts, name, text, "me" if msg.me else "text", to, cid, self.epoch)
        out.store.append(line)
        if to:
            publish = out.publish  # unrolled: faster than a loop over topics
            publish.append((topics[0], line))
            if len(topics) > 1:
                publish.append((topics[1], line))
        else:
            out.publish.append((topic, line))
        stored = _Stored(cid, room, seq, mid, ts)
        dedup = self.dedup
        if cids is None:
            cids = session.recent = dedup.of(name)
        entry = _Entry(now, name, stored)  # Dedup.add, inline
        cids[cid] = stored
        order = cids.order
        order.append(entry)
        if len(order) > dedup.per_user:
            old = order.popleft()
            del cids[old.stored.cid]
            old.dead = True
            dedup.stale += 1
        everything = dedup.order
        everything.append(entry)
        if len(everything) > dedup.high:
            dedup.trim()
        acks = out.acks.get(sid)  # not setdefault: that builds a list to throw away
        if acks is None:
            out.acks[sid] = [stored]
        else:
            acks.append(stored)

    def _dm_cap(self, sid: str, name: str, to: str, room: str, cid: str, out: Outcome) -> bool:
        """Whether the DM conversation ``room`` may (re)gain its missing members."""
        members = self.members.get(room, ())
        if name not in members and not self._room_cap(sid, name, out, cid=cid):
            return False
        if to not in members and not self._room_cap(sid, to, out, cid=cid, whose=to):
            return False
        return True

    def _rate_limited(self, sid: str, cid: str, wait: float, out: Outcome, *, rid: int = 0) -> None:
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
        out.replies.append((sid, p.Error(code=E.RATE_LIMITED, message=message, rid=rid, cid=cid, retry_after=wait)))

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
        ts = now + self.wall_offset
        msg = p.Msg(
            room=room, seq=seq, id=self._id(self.counter), ts=ts, sender=sender,
            text=text, kind=kind, to=to, cid=cid, epoch=self.epoch,
        )
        out.store.append(msg)
        for topic in topics:
            out.publish.append((topic, msg))
        stored = p.Stored(cid, room, seq, msg.id, ts)
        if cid:
            self.dedup.add(sender, stored, now)
        return stored

    # ------------------------------------------------------------ storage failures

    def undo(self, out: Outcome, code: str = E.INTERNAL) -> None:
        """Storage refused ``out.store``: put the core back as if none of it had been
        sequenced, and rewrite ``out`` so the shell carries out only the rest.

        Each room's head returns to its lowest failed seq - 1: nothing of the batch was
        stored or published, and the heads in this outcome's replies (Pong, Welcome,
        Joined, history queries) are lowered to match, so no client ever learns of those
        seqs and the next message may take them. Their cids are forgotten, so a resend
        is stored. Membership changes of ``out.members`` are reverted, newest first (a
        DM's first line made its conversation's members). Then ``out`` keeps no store,
        no member changes and no publication of those messages; their acks become
        errors, and so do the replies to the joins and parts that were undone. Tokens
        spent stay spent; cids the caps evicted for the batch stay evicted (they were
        the oldest). The errors carry ``code`` (``storage_unavailable`` when the store
        cannot take writes now, so clients know to resend later).
        """
        failed = out.store
        lowest: dict[str, int] = {}
        for msg in failed:
            if msg.seq < lowest.get(msg.room, msg.seq + 1):
                lowest[msg.room] = msg.seq
            if msg.cid:
                self.dedup.forget(msg.sender, msg.cid, msg.id)
        for room, seq in lowest.items():
            if seq > 1:
                self.heads[room] = seq - 1
            else:
                self.heads.pop(room, None)
        for room, name, member in reversed(out.members):
            self._apply_member(room, name, not member)
        if failed or out.members:
            self.count("undone_batches")
            log.debug("undid %d message(s) and %d membership change(s)", len(failed), len(out.members))
        ids = {msg.id for msg in failed}
        out.store = []
        out.members = []
        out.publish = [(t, m) for t, m in out.publish if not (type(m) is p.Msg and m.id in ids)]
        if lowest:
            self._lower_heads(out, lowest)
        for i in out.changed:
            sid, body = out.replies[i]
            out.replies[i] = (sid, p.Error(code=code, message="could not store that change; try again", rid=body.rid))  # type: ignore[union-attr]
        out.changed = []
        acks: dict[str, list[p.Stored]] = {}
        for sid, items in out.acks.items():
            kept = []
            for item in items:
                if item.id in ids:
                    out.error(sid, code, "could not store the message; resend it", cid=item.cid)
                else:
                    kept.append(item)
            if kept:
                acks[sid] = kept
        out.acks = acks

    def _lower_heads(self, out: Outcome, rooms: Iterable[str]) -> None:
        """Lower the heads this outcome's replies tell for ``rooms`` to the core's own."""
        heads = self.heads
        undone = set(rooms)

        def fix(told: dict[str, int]) -> dict[str, int]:
            return {room: min(seq, heads.get(room, 0)) if room in undone else seq for room, seq in told.items()}

        for i, (sid, body) in enumerate(out.replies):
            if type(body) is p.Pong:
                out.replies[i] = (sid, msgspec.structs.replace(body, heads=fix(body.heads)))
            elif type(body) is p.Welcome:
                out.replies[i] = (sid, msgspec.structs.replace(body, rooms=fix(body.rooms)))
            elif type(body) is p.Joined and body.room in undone:
                out.replies[i] = (sid, msgspec.structs.replace(body, head=min(body.head, heads.get(body.room, 0))))
        out.queries = [
            dataclasses.replace(q, head=min(q.head, heads.get(q.request.room, 0))) if q.request.room in undone else q
            for q in out.queries
        ]

    def forget(self, failed: Iterable[p.Msg]) -> None:
        """Storage refused a batch: forget its cids so resends are taken afresh (the old
        way, until the shell calls undo). Heads stay where they are."""
        for msg in failed:
            if msg.cid:
                self.dedup.forget(msg.sender, msg.cid, msg.id)

    def shutdown(self, now: float, out: Outcome) -> None:
        out.publish.append((p.SYSTEM_TOPIC, p.Notice(event="shutdown", boot=self.boot, ts=now + self.wall_offset)))
