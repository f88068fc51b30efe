"""Rate limits and budgets, sans I/O: the ``Limits`` a broker runs with, the token
bucket every limit draws from, and the core's budget checks for stored lines."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from zchat import protocol as p
from zchat.protocol import ErrorCode as E

if TYPE_CHECKING:
    from zchat.core.outcome import Outcome


@dataclasses.dataclass(frozen=True)
class Limits:
    # Seconds between client pings. Rare on purpose: 5,000 idle clients pinging every
    # 10 s cost the broker 4.5% of a core, every 60 s about 1%. A session ends when its
    # connection does (the broker's socket monitor, zchat.broker.liveness) or TCP
    # keepalive gives up on a vanished machine (about 2 minutes), and a client sees its
    # broker's process end at once (its DEALER's monitor); pings only bound a
    # connection that stays open but silent (3 x heartbeat: 6 minutes), a lost tail no
    # later line reveals (Pong.heads: one heartbeat) and a broker machine that vanished
    # (1.2 heartbeats and a ping's timeout). docs/protocol.md §9 lists the bounds.
    heartbeat: float = 120.0
    rate: float = 20.0  # chat (and join/part) lines/second per user; 0 disables the limit
    burst: float = 100.0
    max_bytes: int = p.MAX_MESSAGE_BYTES
    pull_port: int = 0
    pub_port: int = 0
    pub_hwm: int = 100_000  # per-subscriber queue on the broker before PUB drops
    # Requests (hello, join, part, history, who, rooms, ping, bye) per second per user
    # name; 0 disables (and so does rate=0, as for room_rate). A client's heartbeat is one per 120 s; a reconnect with many rooms
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
    # Moderation (operators' and admins' actions) per second per user, on top of the
    # request budget; 0 disables (so does rate=0). Caps per room, and broker-wide bans.
    moderation_rate: float = 2.0
    moderation_burst: float = 30.0
    max_ops: int = 100
    max_bans: int = 1_000
    max_invites: int = 1_000
    max_broker_bans: int = 100_000
    # Searches per second per user, on top of the request budget (a search reads far
    # more than a history page); 0 disables (so does rate=0).
    search_rate: float = 1.0
    search_burst: float = 20.0

    def effective(self) -> Limits:
        """These limits as the core applies them: ``rate`` 0 turns every rate limit off
        (requests and rooms too: a trusted deployment, a benchmark)."""
        if self.rate > 0:
            return self
        return dataclasses.replace(self, request_rate=0.0, room_rate=0.0, moderation_rate=0.0, search_rate=0.0)

    @property
    def presence_timeout(self) -> float:
        """A session unheard of for this long is gone: three missed heartbeats."""
        return 3 * self.heartbeat


#: A chat line costs one token per started LINE_TOKEN_BYTES of its text (a line of up to
#: 4 KiB: 1; of 32 KiB: 8), so the per-user and per-room budgets bound bytes as well as
#: lines: a big line is stored, and encrypted for every subscriber, at its size.
LINE_TOKEN_BYTES = 4096


def line_cost(text: str, burst: float) -> float:
    """The tokens ``text`` costs (never more than a full bucket: any line can pass)."""
    if len(text) <= LINE_TOKEN_BYTES // 4:  # at most 4 bytes a character: one token
        return 1.0
    size = len(text) if text.isascii() else len(text.encode())  # isascii: a flag, O(1)
    return min(float(-(-size // LINE_TOKEN_BYTES)), burst)


class TokenBucket:
    """Refills ``rate`` tokens a second up to ``burst``; one token per message (a chat
    line: ``line_cost``)."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now

    def take(self, rate: float, burst: float, now: float, cost: float = 1.0) -> float:
        """0.0 if ``cost`` tokens were taken, else the seconds until they are there."""
        tokens = self.tokens + (now - self.stamp) * rate
        if not tokens < burst:  # min(burst, tokens), without the call (and as min treats NaN)
            tokens = burst
        self.stamp = now
        if tokens >= cost:
            self.tokens = tokens - cost
            return 0.0
        self.tokens = tokens
        return (cost - tokens) / rate

    def full(self, rate: float, burst: float, now: float) -> bool:
        """Whether it has refilled: then dropping it changes nothing."""
        return rate <= 0 or self.tokens + (now - self.stamp) * rate >= burst


class Budgets:
    """Core's budget checks: a token from the user's line bucket, then the room's.
    Mixed into ``Core``; reads its ``limits``, ``buckets`` and ``room_buckets``."""

    # ------------------------------------------------------------ budgets

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

    def _moderation_budget(self, sid: str, name: str, now: float, out: Outcome, rid: int) -> bool:
        """Take a token from ``name``'s moderation bucket (operators' and admins' actions)."""
        lim = self.limits
        return self._kind_budget(
            self.moderation_buckets, lim.moderation_rate, lim.moderation_burst, "moderation_limited",
            "too many moderation actions", sid, name, now, out, rid,
        )

    def _kind_budget(
        self, buckets: dict[str, TokenBucket], rate: float, burst: float, counter: str, what: str,
        sid: str, name: str, now: float, out: Outcome, rid: int,
    ) -> bool:
        """A token from ``name``'s bucket in ``buckets``: a budget of its own for a kind of
        request that costs more than most (moderation, search), on top of the request
        budget. Refused: ``rate_limited`` with ``retry_after``, "WHAT: try again in N s"."""
        if rate <= 0:
            return True
        bucket = buckets.get(name)
        if bucket is None:
            bucket = buckets[name] = TokenBucket(burst, now)
            self._track(name)
        wait = bucket.take(rate, burst, now)
        if wait:
            self.count(counter)
            out.error(sid, E.RATE_LIMITED, f"{what}: try again in {wait:.2f}s", rid=rid, retry_after=wait)
            return False
        return True

    def _room_bucket(self, room: str, now: float) -> TokenBucket:
        bucket = self.room_buckets[room] = TokenBucket(self.limits.room_burst, now)
        self._sweep_rooms.append(room)
        return bucket

    def _room_limited(self, sid: str, room: str, cid: str, wait: float, out: Outcome, *, rid: int = 0, cost: float = 1.0) -> None:
        """Refuse a line over the room's budget; ``cost``: its tokens (the refusal's weight)."""
        self.count("room_limited")
        err = p.Error(code=E.RATE_LIMITED, message=f"{room!r} is too busy: try again in {wait:.2f}s", rid=rid, cid=cid, retry_after=wait)
        if cost > 1.0:
            out.weigh(err, cost)
        out.replies.append((sid, err))

    def _rate_limited(self, sid: str, cid: str, wait: float, out: Outcome, *, rid: int = 0, cost: float = 1.0) -> None:
        """Refuse a line over the rate limit: this runs for every line of a flood. A line
        of ``cost`` tokens weighs that many refusals (guard.Refusals)."""
        counters = self.counters
        counters["rate_limited"] = counters.get("rate_limited", 0) + 1
        # Lines of one turn share `now`, so a flood is refused with few distinct waits,
        # and formatting a float costs more than the rest of the refusal.
        message = self._wait_texts.get(wait)
        if message is None:
            if len(self._wait_texts) >= 1024:
                self._wait_texts.clear()
            message = self._wait_texts[wait] = f"slow down: try again in {wait:.2f}s"
        err = p.Error(code=E.RATE_LIMITED, message=message, rid=rid, cid=cid, retry_after=wait)
        if cost > 1.0:
            out.weigh(err, cost)
        out.replies.append((sid, err))
