"""Sessions and presence, sans I/O: hello and bye, who is online, heartbeat expiry and
the bounded sweep that evicts per-user state nobody needs any more."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from zchat import protocol as p
from zchat.core.outcome import Outcome
from zchat.protocol import ErrorCode as E

if TYPE_CHECKING:
    from zchat.core.limits import TokenBucket
    from zchat.core.sequence import RecentCids

_MAX_CID_LEN = p.MAX_CID_LEN
_LOOKER = p.LOOKER


def valid_sid(sid: str) -> bool:
    """Whether ``sid`` could be a session id this broker gave out."""
    return 0 < len(sid) <= _MAX_CID_LEN and sid.isascii()


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


class Sessions:
    """Core's sessions, users and presence. Mixed into ``Core``; reads its
    ``sessions``, ``devices``, ``users`` and the sweep queues."""

    _expiry_due = float("-inf")  # the earliest time a session may time out (tick scans no sooner)

    # ------------------------------------------------------------ queries

    def online(self, name: str) -> bool:
        return bool(self.devices.get(name)) or name in self.elsewhere

    def heads_of(self, name: str) -> dict[str, int]:
        return {room: self.heads.get(room, 0) for room in self.rooms_of.get(name, ())}

    def tokens_of(self, name: str) -> dict[str, str]:
        """The user's rooms whose wire topic carries a token, with it (Welcome, Pong)."""
        tokens = self.tokens
        if not tokens:
            return {}
        return {room: tokens[room] for room in self.rooms_of.get(name, ()) if room in tokens}

    # ------------------------------------------------------------ auth

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
                    tokens={} if looker else self.tokens_of(name),
                ),
            )
        )

    def _open_session(self, sid: str, name: str, now: float, out: Outcome) -> None:
        self.sessions[sid] = Session(sid, name, now)
        devices = self.devices.setdefault(name, set())
        devices.add(sid)
        if len(devices) == 1:
            out.went.append((name, True))
            if name not in self.elsewhere:
                self._went(name, True, now, out)

    def _close_session(self, sid: str, now: float, out: Outcome) -> None:
        session = self.sessions.pop(sid)
        if session.name == _LOOKER:
            return
        devices = self.devices.get(session.name, set())
        devices.discard(sid)
        if not devices:
            self.devices.pop(session.name, None)
            self._track(session.name)  # its state may be evicted from now on (sweep)
            out.went.append((session.name, False))
            if session.name not in self.elsewhere:
                self._went(session.name, False, now, out)

    def went_elsewhere(self, name: str, online: bool, now: float, out: Outcome) -> None:
        """``name`` came online on some other broker of the set (first one) or went
        offline on the last of them (several brokers: zchat.broker.engines): told in
        their rooms unless this broker's own sessions already say so."""
        if online == (name in self.elsewhere):
            return
        if online:
            self.elsewhere.add(name)
            self.add_user(name)
        else:
            self.elsewhere.discard(name)
        if name not in self.devices:
            self._went(name, online, now, out)

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
                out.publish.append((self._topic(room), p.Presence(room=room, name=name, online=online, ts=ts)))

    def disconnected(self, sid: str, now: float, out: Outcome) -> bool:
        """The shell saw the connection ``sid`` spoke on end (its process died, its
        socket closed, TCP keepalive gave up): the session is gone now, not after
        three missed heartbeats. Whether there was a session to close."""
        if sid not in self.sessions:
            return False
        self.count("session_disconnected")
        self._close_session(sid, now, out)
        return True

    def tick(self, now: float, out: Outcome) -> None:
        """Expire sessions that missed their heartbeats (their users go offline), and
        evict a bounded amount of state nobody needs any more."""
        if now >= self._expiry_due:  # no session can have expired before then: skip the scan
            timeout = self.limits.presence_timeout
            deadline = now - timeout
            oldest = now
            for s in self.sessions.values():
                if s.last_seen < oldest:
                    oldest = s.last_seen
            if oldest < deadline:
                for sid in [s.sid for s in self.sessions.values() if s.last_seen < deadline]:
                    self.count("session_expired")
                    self._close_session(sid, now, out)
                oldest = min((s.last_seen for s in self.sessions.values()), default=now)
            # last_seen only grows and new sessions start at now: nothing expires sooner.
            self._expiry_due = oldest + timeout
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
            if name in self.devices:
                # Online: nothing of theirs goes. They leave the queue (an idle broker's
                # tick looked at 1,000 online users a second for nothing) and come back
                # when their last session closes (_close_session).
                self._tracked.discard(name)
            elif not self._evict_user(name, now):
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
        moderation = self.moderation_buckets.get(name)
        if moderation is not None and not moderation.full(lim.moderation_rate, lim.moderation_burst, now):
            return False
        if lines is not None and not lines.full(lim.rate, lim.burst, now):
            return False
        search = self.search_buckets.get(name)
        if search is not None and not search.full(lim.search_rate, lim.search_burst, now):
            return False
        self.search_buckets.pop(name, None)
        self.request_buckets.pop(name, None)
        self.moderation_buckets.pop(name, None)
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
