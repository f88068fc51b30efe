"""The several-broker engine: brokers that share one Redis make one conversation.

The path of a line: the core checks it (session, membership, rate, its own dedup) and
gives it a placeholder seq; ``store`` runs one script per room of the turn
(zchat.storage.redis_scripts.SEQUENCE_LUA) that takes the next seqs from the room's
head in Redis, stores, remembers (sender, cid) and PUBLISHes the new lines, all at
once; ``Core.renumber`` then puts the real seqs in the turn's publications and acks (a
(sender, cid) another broker stored first gets that first ack back and is not
published). Only then does anything leave this broker: durable before visible.

Other brokers' lines arrive on Redis pub/sub: a channel per public room (subscribed
while a client of this broker is in the room) and one per user inbox (DMs, while the
user is online here). The listener queues them; the loop's next turn re-publishes
them on the XPUB (``drain``). A line lost on the way (the subscription came late, the
connection to Redis dropped) is a gap the clients fill from history (Heads, Pong): on
every (re)subscription the room's head is read from Redis and told to the room.

Presence and membership: membership changes are PUBLISHed by the script on the events
channel; presence by ``after`` ("p BROKER NAME 1|0"). Every broker keeps a heartbeat
key ``broker:ID`` with a TTL of PRESENCE_TTL seconds, renewed every BEAT seconds, and
the set ``online:ID`` of its users; a broker whose key expired (kill -9, a cut
network) is taken as gone by the others, who mark its users offline: within
PRESENCE_TTL + BEAT seconds of its last beat.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from collections.abc import Callable
from typing import Any

import msgspec

from zchat import protocol as p
from zchat.core import Core, Outcome
from zchat.storage.redis import RedisStorage, decode_stored

log = logging.getLogger(__name__)

#: Seconds a broker's heartbeat key lives; a broker silent that long is gone.
PRESENCE_TTL = 5.0
#: Seconds between heartbeats (and between looks for brokers that are gone).
BEAT = 1.0
#: Items from Redis the loop has not taken yet; beyond it the oldest lines are
#: dropped (clients fill them from history) and membership is read again.
MAX_QUEUED = 10_000
#: Seconds between attempts to reach Redis again after the subscription broke.
RETRY = 0.5
#: Seconds between looks at which channels the subscription should hold.
FOLLOW = 0.05


def parse_payload(payload: bytes) -> tuple[str, list[tuple[int, bytes]]]:
    """A PUBLISH of SEQUENCE_LUA: (origin, [(seq, body)...])."""
    origin, _, rest = payload.partition(b"\n")
    items = []
    i, n = 0, len(rest)
    while i < n:
        nl = rest.index(b"\n", i)
        seq, size = rest[i:nl].split(b" ")
        start = nl + 1
        end = start + int(size)
        items.append((int(seq), rest[start:end]))
        i = end
    return origin.decode(), items


class RedisEngine:
    """Sequencing, fan-out, presence and membership shared through Redis."""

    name = "redis"

    def __init__(self, storage: RedisStorage, poke: Callable[[], None]) -> None:
        self.storage = storage
        self.poke = poke
        self.id = secrets.token_hex(6)
        self.queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self.remote: dict[str, set[str]] = {}  # broker id -> names online there
        self.wanted: set[str] = set()  # channels this broker's clients need
        self.subscribed: set[str] = set()
        self.core: Core | None = None
        self._tasks: list[asyncio.Task] = []
        self._pubsub: Any = None
        self._resync = False
        self._broken = False  # the subscription's connection failed: the reader makes a new one
        self._check: set[str] = set()  # rooms whose head to read from Redis (the listener does)

    # ------------------------------------------------------------ keys

    def _key(self, *parts: str) -> str:
        return self.storage._key(*parts)

    def channels(self, room: str) -> list[str]:
        """Where a room's new lines are PUBLISHed: its channel, or for a DM
        conversation the inbox channels of its two users."""
        peers = p.dm_peers(room)
        if peers is None:
            return [self.storage.channel(room)]
        return [self.storage.inbox_channel(name) for name in dict.fromkeys(peers)]

    # ------------------------------------------------------------ life cycle

    async def start(self, core: Core) -> None:
        """Beat once, learn who is online on the live brokers, then listen."""
        self.core = core
        await self._subscribe_fresh()
        redis = self.storage._redis
        await self._beat()
        others = [b.decode() for b in await redis.smembers(self._key("brokers")) if b.decode() != self.id]
        now = asyncio.get_running_loop().time()
        for broker in others:
            if await redis.exists(self._key("broker", broker)):
                names = {n.decode() for n in await redis.smembers(self._key("online", broker))}
                self.remote[broker] = names
                for name in names:
                    core.went_elsewhere(name, True, now, Outcome())
        log.info("several brokers on Redis: this broker is %s; %d other(s) alive", self.id, len(self.remote))
        self._tasks = [asyncio.ensure_future(t) for t in (self._listen(), self._following(), self._beats())]

    async def stop(self) -> None:
        """Say goodbye (the others mark our users offline at once) and stop listening."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        try:
            async with self.storage._redis.pipeline(transaction=False) as pipe:
                pipe.publish(self.storage.events_channel, f"x {self.id}")
                pipe.delete(self._key("broker", self.id))  # one key a DEL: they may be on two shards
                pipe.delete(self._key("online", self.id))
                pipe.srem(self._key("brokers"), self.id)
                await pipe.execute()
        except Exception as exc:  # Redis gone: the heartbeat key expires by itself
            log.info("could not say goodbye on Redis: %r", exc)
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception as exc:  # the connection is gone already
                log.debug("closing the old subscription: %r", exc)

    # ------------------------------------------------------------ writes

    async def store(self, core: Core, out: Outcome) -> None:
        """One SEQUENCE script per room of the turn; then the turn carries real seqs."""
        rooms: dict[str, tuple[list[p.Msg], list[tuple[str, str, bool]]]] = {}
        for msg in out.store:
            rooms.setdefault(msg.room, ([], []))[0].append(msg)
        for change in out.members:
            rooms.setdefault(change[0], ([], []))[1].append(change)
        sequence = self.storage.sequence
        done = await asyncio.gather(
            *(sequence(room, msgs, members, self.id, self.channels(room)) for room, (msgs, members) in rooms.items()),
            return_exceptions=True,
        )
        for result in done:
            if isinstance(result, BaseException):
                raise result
        given: dict[str, tuple[int, str | None, float]] = {}
        heads: dict[str, int] = {}
        for (room, (msgs, _)), (head, results) in zip(rooms.items(), done):  # type: ignore[misc]
            heads[room] = head
            for msg, r in zip(msgs, results):
                given[msg.id] = (r.seq, r.id, r.ts)
        core.renumber(out, given, heads)

    async def after(self, core: Core, out: Outcome) -> None:
        """Tell the other brokers who came and went here; follow new rooms at once."""
        if out.went:
            events, mine = self.storage.events_channel, self._key("online", self.id)
            try:
                async with self.storage._redis.pipeline(transaction=False) as pipe:
                    for name, online in out.went:
                        (pipe.sadd if online else pipe.srem)(mine, name)
                        pipe.publish(events, f"p {self.id} {name} {'1' if online else '0'}")
                    await pipe.execute()
            except Exception as exc:
                log.warning("could not share presence on Redis: %r", exc)
        if out.room_changes:
            try:
                async with self.storage._redis.pipeline(transaction=False) as pipe:
                    for room, role, value, on in out.room_changes:
                        pipe.publish(self.storage.events_channel, f"r {self.id} {room} {role} {'1' if on else '0'} {value}")
                    await pipe.execute()
            except Exception as exc:  # stored already: the others read it at their next start
                log.warning("could not share room settings on Redis: %r", exc)
        if out.went or out.members:
            self._want(core)

    def _want(self, core: Core) -> None:
        """The channels this broker's online users need: their public rooms and inboxes."""
        wanted = set()
        storage = self.storage
        for name in core.devices:
            wanted.add(storage.inbox_channel(name))
            for room in core.rooms_of.get(name, ()):
                if not p.is_dm_room(room):
                    wanted.add(storage.channel(room))
        self.wanted = wanted

    # ------------------------------------------------------------ reads

    def drain(self, core: Core, now: float, out: Outcome) -> int:
        """Carry what other brokers did into this turn: re-publish their lines (and
        follow heads), apply membership and presence. Returns how many items."""
        queue = self.queue
        count = 0
        while queue and count < 1024:
            item = queue.popleft()
            count += 1
            kind = item[0]
            if kind == "lines":
                _, topic, msgs = item
                if topic is None:  # a room's: its topic here (a private room's carries our token)
                    topic = core._topic(msgs[0].room)
                for msg in msgs:
                    core.saw(msg.room, msg.seq)
                    out.publish.append((topic, msg))
            elif kind == "head":
                _, room, head = item
                if head > core.heads.get(room, 0):
                    core.saw(room, head)
                    heads = p.Heads(epoch=core.epoch, heads={room: head})
                    peers = p.dm_peers(room)
                    for topic in [core._topic(room)] if peers is None else [p.inbox_topic(n) for n in dict.fromkeys(peers)]:
                        out.publish.append((topic, heads))  # type: ignore[arg-type]
            elif kind == "event":
                self._event(core, item[1], now, out)
            elif kind == "members":
                self._members(core, item[1])
        return count

    def _event(self, core: Core, text: str, now: float, out: Outcome) -> None:
        parts = text.split(" ")
        kind, origin = parts[0], parts[1]
        if origin == self.id:
            return
        if kind == "m" and len(parts) == 5:
            _, _, room, name, flag = parts
            changed = core.member_elsewhere(room, name, flag == "1")
            if changed and flag == "0" and room in core.private:
                core._rotate(room, out)  # as the broker that removed them did: they lose the topic here too
            if changed and name in core.devices:
                self._want(core)
                self._check.add(room)  # its lines may have come before our subscription
        elif kind == "r":  # a room setting (private, operators, invites, bans...): r ORIGIN ROOM ROLE FLAG VALUE
            _, _, room, role, flag, value = text.split(" ", 5)
            core._apply_role(room, role, value, flag == "1")
        elif kind == "p" and len(parts) == 4:
            _, _, name, flag = parts
            names = self.remote.setdefault(origin, set())
            (names.add if flag == "1" else names.discard)(name)
            self._presence(core, name, now, out)
        elif kind in ("x", "gone"):
            self._gone(core, origin, now, out)

    def _presence(self, core: Core, name: str, now: float, out: Outcome) -> None:
        core.went_elsewhere(name, any(name in names for names in self.remote.values()), now, out)

    def _gone(self, core: Core, broker: str, now: float, out: Outcome) -> None:
        names = self.remote.pop(broker, set())
        if names:
            log.info("broker %s is gone: %d of its users offline unless they are elsewhere", broker, len(names))
        for name in names:
            self._presence(core, name, now, out)

    def _members(self, core: Core, members: dict[str, set[str]]) -> None:
        """Membership read again from Redis (after a broken subscription)."""
        for room in set(core.members) | set(members):
            have, want = core.members.get(room, set()), members.get(room, set())
            for name in want - have:
                core.member_elsewhere(room, name, True)
            for name in have - want:
                core.member_elsewhere(room, name, False)
        self._want(core)

    def _put(self, item: tuple[Any, ...]) -> None:
        if len(self.queue) >= MAX_QUEUED:
            dropped = self.queue.popleft()
            if dropped[0] != "lines":
                self._resync = True  # a membership or presence change lost: read it all again
        self.queue.append(item)
        self.poke()

    # ------------------------------------------------------------ background

    async def _subscribe_fresh(self) -> None:
        """A new pub/sub connection holding every channel we want."""
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception as exc:  # the connection is gone already
                log.debug("closing the old subscription: %r", exc)
        self._pubsub = self.storage.pubsub()
        await self._pubsub.subscribe(self.storage.events_channel)
        self.subscribed = set()

    async def _listen(self) -> None:
        """Read pub/sub, blocking (a timed read left messages already buffered unread
        until the next timeout: seconds of lag at 1,000 lines/s); start over when it
        breaks. The channels are changed by ``_following``, on the same connection."""
        events = self.storage.events_channel
        while True:
            try:
                if self._broken:
                    await self._subscribe_fresh()
                    self._broken = False
                message = await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._broken:
                    log.warning("lost the Redis subscription (%r): trying again every %gs", exc, RETRY)
                self._broken = True
                await asyncio.sleep(RETRY)
                continue
            if message is None:
                continue
            kind, channel = message["type"], message["channel"].decode()
            if kind == "subscribe":  # (the room's topic is the core's: see drain)
                try:
                    await self._caught_up(channel, channel == events)
                except Exception as exc:
                    log.warning("could not read Redis after subscribing to %s: %r", channel, exc)
                    self._broken = True
            elif kind == "message":
                data = message["data"]
                if channel == events:
                    self._put(("event", data.decode()))
                else:
                    self._lines(channel, data)

    async def _following(self) -> None:
        """Keep the subscription's channels what ``wanted`` says (every FOLLOW seconds)."""
        while True:
            await asyncio.sleep(FOLLOW)
            if self._broken or self._pubsub is None:
                continue
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the reader notices a broken connection and starts over
                log.debug("could not change the subscription: %r", exc)

    async def _follow(self) -> None:
        wanted, subscribed = self.wanted, self.subscribed
        if self._resync:
            self._resync = False
            self._put(("members", await self.storage.members()))
        if self._check:
            rooms, self._check = sorted(self._check), set()
            for room in rooms:
                self._put(("head", room, await self.storage.head(room)))
        new, old = wanted - subscribed, subscribed - wanted
        if new:
            await self._pubsub.subscribe(*new)
            subscribed |= new
        if old:
            await self._pubsub.unsubscribe(*old)
            subscribed -= old

    async def _caught_up(self, channel: str, is_events: bool) -> None:
        """A subscription took effect: what was published before it is read from Redis
        (membership for the events channel; the room's head for a room's)."""
        storage = self.storage
        if is_events:
            if self.core is not None and self._tasks:  # not the first: something may be missed
                self._put(("members", await storage.members()))
            return
        prefix, inbox = storage.prefix + "{", storage.prefix + "inbox:"
        if channel.startswith(prefix) and channel.endswith("}:pub"):
            self._check.add(channel[len(prefix):-len("}:pub")])
        elif channel.startswith(inbox) and self.core is not None:
            self._check.update(r for r in self.core.rooms_of.get(channel[len(inbox):], ()) if p.is_dm_room(r))

    def _lines(self, channel: str, data: bytes) -> None:
        origin, items = parse_payload(data)
        if origin == self.id or self.core is None:
            return
        epoch = self.core.epoch
        msgs = [decode_stored(body, seq) for seq, body in items]
        msgs = [m if m.epoch == epoch else _with_epoch(m, epoch) for m in msgs]
        inbox = self.storage.prefix + "inbox:"
        topic = p.inbox_topic(channel[len(inbox):]) if channel.startswith(inbox) else None
        self._put(("lines", topic, msgs))

    async def _beat(self) -> None:
        redis = self.storage._redis
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(self._key("broker", self.id), "1", px=int(PRESENCE_TTL * 1000))
            pipe.sadd(self._key("brokers"), self.id)
            await pipe.execute()

    async def _beats(self) -> None:
        """Renew our heartbeat key; find brokers whose key expired and tell the loop."""
        redis = self.storage._redis
        while True:
            await asyncio.sleep(BEAT)
            try:
                await self._beat()
                if self.core is not None:
                    self._want(self.core)
                # The brokers known to the set, and those we hold users of: another broker
                # may have taken a dead one out of the set before we looked.
                brokers = {b.decode() for b in await redis.smembers(self._key("brokers"))} | set(self.remote)
                others = sorted(b for b in brokers if b != self.id)
                if not others:
                    continue
                async with redis.pipeline(transaction=False) as pipe:
                    for broker in others:
                        pipe.exists(self._key("broker", broker))
                    alive = await pipe.execute()
                for broker, up in zip(others, alive):
                    if up:
                        if broker not in self.remote:
                            names = {n.decode() for n in await redis.smembers(self._key("online", broker))}
                            self.remote.setdefault(broker, set())
                            for name in names:
                                self._put(("event", f"p {broker} {name} 1"))
                        continue
                    await redis.srem(self._key("brokers"), broker)
                    await redis.delete(self._key("online", broker))
                    self._put(("event", f"gone {broker}"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("Redis heartbeat failed: %r", exc)


def _with_epoch(msg: p.Msg, epoch: str) -> p.Msg:
    return msgspec.structs.replace(msg, epoch=epoch)
