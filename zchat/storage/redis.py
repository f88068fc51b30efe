"""History, users and memberships in Redis, so several brokers can share one store.

Layout (every key starts with ``prefix``): each room's keys carry the room in a hash
tag, ``{room}:log``, ``{room}:head``, ``{room}:members``, ``{room}:cids``, ``{room}:cidq``
(see zchat.storage.redis_scripts), so a room lives on one Redis Cluster shard. Besides:

- ``rooms``    set of rooms that ever had a message or a member (``heads``, ``members``)
- ``recent``   list of encoded Msgs that carry a cid, newest first, capped (warm-up)
- ``epoch``    string, set once with SET NX (renewed after a lossy Redis restart)
- ``run``      the Redis server's run id at the last open (to notice a restart)
- ``users``    hash name -> digest, claimed with HSETNX (first owner wins)
- ``invites``  sorted set, score = expiry (wall-clock), member = an unused invite code
- ``revoked``  sorted set, score = when, member = a revoked raw public key
- ``role:{role}:{room}`` set of a room setting's values; ``roles`` the set of
  ``role NUL room`` that have any (see Storage.change_rooms)

Two writes: ``append`` (the Storage interface: the caller's seqs, one script) and
``sequence`` (the several-broker engine: one script per room assigns the seqs from the
room's head in Redis, dedups (sender, cid), stores and PUBLISHes, atomically).
Durability is the Redis server's: run it with ``appendonly yes`` and ``appendfsync
always`` for an ack to survive a crash (docs/architecture.md, Several brokers).
The redis package is imported lazily: zchat runs without the ``redis`` extra.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from zchat.protocol import Msg, encode
from zchat.storage.base import (
    TOMBSTONED_KINDS,
    Found,
    MemberChange,
    Page,
    RoomChange,
    SearchUnsupported,
    StorageError,
    StorageUnavailable,
    msg_bytes,
)
from zchat.storage.redis_scripts import APPEND_LUA, RELEASE_LUA, SEQUENCE_LUA

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

#: How many cid-carrying messages ``recent`` can return (the dedup warm-up window).
RECENT_CAP = 10_000
#: (sender, cid) pairs each room remembers for dedup across brokers (its newest lines).
CID_CAP = 10_000

# Our own decoder: protocol.decode_event enforces the wire size limit, which a stored
# Msg (a near-limit Send plus seq, id, ts, sender) may legitimately exceed.
_msg_decoder = msgspec.msgpack.Decoder(Msg)


@dataclass(frozen=True)
class Sequenced:
    """What ``RedisStorage.sequence`` did with one message: its seq, and for a
    duplicate (sender, cid) the id and ts it was first stored with (else None)."""

    seq: int
    id: str | None = None
    ts: float = 0.0


def _stored_body(m: Msg) -> bytes:
    """A message as kept in a room's log: its seq is the score, its epoch the store's."""
    return encode(msgspec.structs.replace(m, seq=0, epoch=""))


def decode_stored(body: bytes, seq: int) -> Msg:
    """A message from a room's log (or a PUBLISH payload) with its seq put back."""
    return msgspec.structs.replace(_msg_decoder.decode(body), seq=seq)


# KEYS: invites. ARGV: code, expires, now, limit. 1 if kept, 0 at the cap (or a known code).
_ADD_INVITE_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
return redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
"""

# KEYS: invites. ARGV: code, now. The code's expiry (a string) once, else 0: one step,
# so of two brokers taking one code at once, one wins.
_USE_INVITE_LUA = """
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expires then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(expires) <= tonumber(ARGV[2]) then return 0 end
return expires
"""

# KEYS: roles, then one role key per change. ARGV: (role NUL room, value, "1"/"0") per change.
_ROLES_LUA = """
for i = 1, #KEYS - 1 do
    local key, index, value = KEYS[i + 1], ARGV[3 * i - 2], ARGV[3 * i - 1]
    if ARGV[3 * i] == '1' then
        redis.call('SADD', key, value)
        redis.call('SADD', KEYS[1], index)
    else
        redis.call('SREM', key, value)
        if redis.call('SCARD', key) == 0 then
            redis.call('SREM', KEYS[1], index)
        end
    end
end
return 0
"""

# KEYS: {room}:log. ARGV: seq, the stored body, its tombstone. Replaces the body only
# if it is still the one read (compare and set).
_TOMBSTONE_LUA = """
local found = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])
if #found ~= 1 or found[1] ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# KEYS: recent. ARGV: the line as the list holds it, its tombstone. A step of its own
# (another key, maybe another cluster shard): the list is only the dedup warm-up.
_TOMBSTONE_RECENT_LUA = """
local at = redis.call('LPOS', KEYS[1], ARGV[1])
if at then redis.call('LSET', KEYS[1], at, ARGV[2]) end
return 0
"""


def _page(rows: list[tuple[bytes, float]], max_bytes: int) -> Page:
    """Decoded messages within max_bytes (at least one), in the order given."""
    page = Page()
    size = 0
    for body, score in rows:
        msg = decode_stored(body, int(score))
        size += msg_bytes(msg)
        if max_bytes and size > max_bytes and page:
            page.cut = True
            break
        page.append(msg)
    return page


def _import_redis() -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError as exc:
        raise StorageError("Redis storage needs the redis package: pip install 'zchat[redis]'") from exc
    return aioredis


class RedisStorage:
    """The Storage interface on a Redis server (see zchat.storage.base), and the
    several-broker engine's atomic write (``sequence``)."""

    def __init__(self, url: str, prefix: str = "zchat:", cluster: bool = False) -> None:
        self._aioredis = _import_redis()
        self.url = url
        self.prefix = prefix
        self.cluster = cluster  # a Redis Cluster: rooms spread over shards by their {room} tag
        self.epoch = ""
        self._client: Redis | None = None
        self._append_script: Any = None
        self._sequence_script: Any = None
        self._seed: Any = None  # a plain client on a cluster's seed node, for pub/sub

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def room_key(self, room: str, what: str) -> str:
        """One of ``room``'s keys: the room in a hash tag keeps them on one shard."""
        return f"{self.prefix}{{{room}}}:{what}"

    def channel(self, room: str) -> str:
        """The PUBLISH channel of a public room's new messages."""
        return f"{self.prefix}{{{room}}}:pub"

    def inbox_channel(self, name: str) -> str:
        """The PUBLISH channel of a user's DM messages."""
        return f"{self.prefix}inbox:{name}"

    @property
    def events_channel(self) -> str:
        """The channel of membership changes (and the engine's presence and names)."""
        return self._key("events")

    # ------------------------------------------------------------ lifecycle

    def pubsub(self) -> Any:
        """A pub/sub object for the several-broker engine. On a Redis Cluster it is on the
        seed node of the URL: PUBLISH is broadcast to every node of a cluster."""
        if self.cluster:
            if self._seed is None:
                self._seed = self._aioredis.from_url(self.url)
            return self._seed.pubsub()
        return self._redis.pubsub()

    async def open(self) -> str:
        client = self._aioredis.RedisCluster.from_url(self.url) if self.cluster else self._aioredis.from_url(self.url)
        try:
            await client.ping()
            await self._new_epoch_if_rolled_back(client)
            await client.set(self._key("epoch"), secrets.token_hex(8), nx=True)
            epoch = await client.get(self._key("epoch"))
        except self._aioredis.RedisError as exc:
            await client.aclose()
            raise StorageError(f"cannot use Redis at {self.url}: {exc}") from exc
        self._client = client
        self._append_script = client.register_script(APPEND_LUA)
        self._sequence_script = client.register_script(SEQUENCE_LUA)
        self.epoch = epoch.decode()
        log.info("opened Redis history %s prefix %r (epoch %s)", self.url, self.prefix, self.epoch)
        return self.epoch

    async def _new_epoch_if_rolled_back(self, client: Any) -> None:
        """A Redis server that restarted may have lost its last writes (AOF ``everysec``
        loses up to a second; no persistence loses all): new messages would then reuse
        seqs clients saw. So unless it fsyncs every write (``appendfsync always``), a
        server with another run id than at our last open starts a new epoch. Costs
        nothing per message; a Redis restart costs clients a fresh start."""
        # On a cluster: the node that holds the epoch (a lossy restart of another shard
        # is not noticed here: every node must fsync every write).
        where = {"target_nodes": client.get_node_from_key(self._key("epoch"))} if self.cluster else {}
        info = await client.info("server", **where)
        run_id = str(info.get("run_id", ""))
        try:
            fsync = (await client.config_get("appendfsync", **where)).get("appendfsync", "")
            aof = (await client.config_get("appendonly", **where)).get("appendonly", "")
        except self._aioredis.ResponseError:  # CONFIG renamed or disabled: assume the worst
            fsync = aof = ""
        seen = await client.get(self._key("run"))
        durable = aof == "yes" and fsync == "always"
        if seen is not None and seen.decode() != run_id and not durable:
            old = await client.get(self._key("epoch"))
            await client.delete(self._key("epoch"))
            log.warning(
                "Redis %s restarted since this store was last opened and does not fsync every write "
                "(appendonly %s, appendfsync %s): its last writes may be lost, so epoch %s ends here",
                self.url, aof or "?", fsync or "?", old.decode() if old else "?",
            )
        elif not durable:
            log.warning(
                "Redis %s does not fsync every write (appendonly %s, appendfsync %s): a Redis crash may lose "
                "recent messages; the next broker start then begins a new epoch", self.url, aof or "?", fsync or "?",
            )
        await client.set(self._key("run"), run_id)

    async def close(self) -> None:
        if self._seed is not None:
            await self._seed.aclose()
            self._seed = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def _redis(self) -> Redis:
        if self._client is None:
            raise StorageError("Redis storage is not open")
        return self._client

    # -------------------------------------------------------------- history

    async def append(self, messages: Sequence[Msg], members: Sequence[MemberChange] = ()) -> None:
        """Store all messages and membership changes in one script run; a duplicate
        (room, seq) stores none. One Redis server (the keys span rooms)."""
        if not messages and not members:
            return
        keys = [self.room_key(m.room, "log") for m in messages] + [self.room_key(m.room, "head") for m in messages]
        args: list[str | int | bytes] = [len(messages)]
        for m in messages:
            args += [m.seq, _stored_body(m)]
        for room, name, member in members:
            keys.append(self.room_key(room, "members"))
            args += [name, "1" if member else "0"]
        try:
            duplicate = await self._append_script(keys=keys, args=args, client=self._redis)
        except self._aioredis.RedisError as exc:  # unreachable, OOM (maxmemory), MISCONF (a failing BGSAVE)
            raise StorageUnavailable(f"Redis append failed: {exc}") from exc
        if duplicate:
            m = messages[duplicate - 1]
            raise StorageError(
                f"refused {len(messages)} messages: (room, seq) ({m.room!r}, {m.seq}) already stored"
            )
        await self._after_write(messages, members)

    async def _after_write(self, messages: Sequence[Msg], members: Sequence[MemberChange]) -> None:
        """The global indexes (no room's own: outside the room scripts, so they stay on
        one shard): rooms known, and the dedup warm-up list. Idempotent."""
        rooms = {m.room for m in messages} | {room for room, _, member in members if member}
        with_cid = [encode(msgspec.structs.replace(m, epoch="")) for m in messages if m.cid]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                if rooms:
                    pipe.sadd(self._key("rooms"), *rooms)
                if with_cid:
                    pipe.lpush(self._key("recent"), *with_cid)
                    pipe.ltrim(self._key("recent"), 0, RECENT_CAP - 1)
                await pipe.execute()
        except self._aioredis.RedisError as exc:
            raise StorageUnavailable(f"Redis index update failed: {exc}") from exc

    async def sequence(
        self, room: str, messages: Sequence[Msg], members: Sequence[MemberChange], origin: str, channels: Sequence[str],
    ) -> tuple[int, list[Sequenced]]:
        """Give ``room``'s messages the next seqs after the room's head in Redis, store
        them with ``members`` (all of this room's), remember their (sender, cid) and
        PUBLISH them on ``channels``, in one script run; a (sender, cid) already stored
        is not stored again and gets its first Sequenced back. Returns the room's head
        and one Sequenced per message. The seqs in ``messages`` are ignored."""
        keys = [self.room_key(room, what) for what in ("log", "head", "members", "cids", "cidq")]
        args: list[str | int | bytes] = [" ".join(channels), origin, CID_CAP, len(messages), self.events_channel, room]
        for m in messages:
            args += [f"{m.sender} {m.cid}" if m.cid else "", m.id, repr(m.ts), _stored_body(m)]
        for change_room, name, member in members:
            assert change_room == room, "sequence takes one room's changes"
            args += [name, "1" if member else "0"]
        try:
            raw = await self._sequence_script(keys=keys, args=args, client=self._redis)
        except self._aioredis.RedisError as exc:
            raise StorageUnavailable(f"Redis sequence of {room!r} failed: {exc}") from exc
        results = []
        for item in raw[1:]:
            if isinstance(item, int):
                results.append(Sequenced(item))
            else:
                seq, mid, ts = item.decode().split(" ")
                results.append(Sequenced(int(seq), mid, float(ts)))
        fresh = [msgspec.structs.replace(m, seq=r.seq) for m, r in zip(messages, results) if r.id is None]
        await self._after_write(fresh, members)
        return int(raw[0]), results

    async def head(self, room: str) -> int:
        """The highest seq given out in ``room`` (0 for none)."""
        value = await self._redis.get(self.room_key(room, "head"))
        return int(value) if value else 0

    async def heads(self) -> dict[str, int]:
        r = self._redis
        rooms = sorted(room.decode() for room in await r.smembers(self._key("rooms")))
        async with r.pipeline(transaction=False) as pipe:
            for room in rooms:
                pipe.get(self.room_key(room, "head"))
            values = await pipe.execute()
        return {room: int(v) for room, v in zip(rooms, values) if v}

    async def range(self, room: str, after: int, limit: int, before: int = 0, max_bytes: int = 0) -> Page:
        if limit <= 0:
            return Page()
        upper = f"({before}" if before > 0 else "+inf"
        raw = await self._redis.zrangebyscore(
            self.room_key(room, "log"), f"({after}", upper, start=0, num=limit, withscores=True
        )
        return _page(raw, max_bytes)

    async def last(self, room: str, limit: int, before: int = 0, max_bytes: int = 0) -> Page:
        if limit <= 0:
            return Page()
        upper = f"({before}" if before > 0 else "+inf"
        raw = await self._redis.zrevrangebyscore(
            self.room_key(room, "log"), upper, "-inf", start=0, num=limit, withscores=True
        )
        page = _page(raw, max_bytes)
        page.reverse()
        return page

    async def prune(self, room: str, keep: int = 0, before_ts: float = 0.0, batch: int = 500) -> int:
        """Delete a batch of room's oldest messages past retention (see Storage.prune).

        Reads the oldest ``batch`` entries, picks the highest seq that may go, then
        ZREMRANGEBYSCORE up to it: by score, not rank, so brokers pruning the same room at
        once never remove more than retention allows. The head key is kept apart, so the
        head survives anyway; the newest message stays too, as with SQLite.
        """
        if batch <= 0 or (keep <= 0 and before_ts <= 0):
            return 0
        r = self._redis
        key = self.room_key(room, "log")
        try:
            async with r.pipeline(transaction=False) as pipe:
                pipe.zcard(key)
                pipe.zrange(key, 0, batch - 1, withscores=True)
                total, oldest = await pipe.execute()
            if total <= 1 or not oldest:
                return 0
            count = max(0, total - keep) if keep > 0 else 0
            if before_ts > 0:
                old = 0
                for body, _score in oldest:
                    if _msg_decoder.decode(body).ts >= before_ts:
                        break
                    old += 1
                count = max(count, old)
            count = min(count, len(oldest), total - 1)
            if count <= 0:
                return 0
            return int(await r.zremrangebyscore(key, "-inf", oldest[count - 1][1]))
        except self._aioredis.RedisError as exc:
            raise StorageUnavailable(f"Redis prune of {room!r} failed: {exc}") from exc

    async def first_seq(self, room: str) -> int:
        first = await self._redis.zrange(self.room_key(room, "log"), 0, 0, withscores=True)
        return int(first[0][1]) if first else 0

    async def recent(self, limit: int) -> list[Msg]:
        if limit <= 0:
            return []
        raw = await self._redis.lrange(self._key("recent"), 0, limit - 1)
        return [_msg_decoder.decode(body) for body in reversed(raw)]

    # ---------------------------------------------------- users and members

    async def get_user(self, name: str) -> bytes | None:
        digest: bytes | None = await self._redis.hget(self._key("users"), name)
        return digest

    async def users(self) -> set[str]:
        return {name.decode() for name in await self._redis.hkeys(self._key("users"))}

    async def add_user(self, name: str, digest: bytes) -> bool:
        return bool(await self._redis.hsetnx(self._key("users"), name, digest))

    async def members(self) -> dict[str, set[str]]:
        r = self._redis
        rooms = sorted(room.decode() for room in await r.smembers(self._key("rooms")))
        async with r.pipeline(transaction=False) as pipe:
            for room in rooms:
                pipe.smembers(self.room_key(room, "members"))
            sets = await pipe.execute()
        return {room: {n.decode() for n in names} for room, names in zip(rooms, sets) if names}

    async def set_member(self, room: str, name: str, member: bool) -> None:
        r = self._redis
        if member:
            await r.sadd(self.room_key(room, "members"), name)
            await r.sadd(self._key("rooms"), room)
        else:
            await r.srem(self.room_key(room, "members"), name)

    # ---------------------------------------------------- room settings

    async def change_rooms(self, changes: Sequence[RoomChange]) -> None:
        if not changes:
            return
        keys = [self._key("roles")]
        args: list[str] = []
        for room, role, value, on in changes:
            keys.append(self._key("role", role, room))
            args += [f"{role}\0{room}", value, "1" if on else "0"]
        try:
            if self.cluster:  # the keys are on several shards: one command each (rooms_state skips empty sets)
                async with self._redis.pipeline(transaction=False) as pipe:
                    for (room, role, value, on), key in zip(changes, keys[1:]):
                        (pipe.sadd if on else pipe.srem)(key, value)
                        if on:
                            pipe.sadd(keys[0], f"{role}\0{room}")
                    await pipe.execute()
            else:
                await self._redis.eval(_ROLES_LUA, len(keys), *keys, *args)
        except self._aioredis.RedisError as exc:
            raise StorageUnavailable(f"Redis room settings failed: {exc}") from exc

    async def rooms_state(self) -> dict[str, dict[str, set[str]]]:
        r = self._redis
        pairs = [index.decode().split("\0", 1) for index in await r.smembers(self._key("roles"))]
        async with r.pipeline(transaction=False) as pipe:
            for role, room in pairs:
                pipe.smembers(self._key("role", role, room))
            sets = await pipe.execute()
        state: dict[str, dict[str, set[str]]] = {}
        for (role, room), values in zip(pairs, sets):
            if values:
                state.setdefault(room, {})[role] = {v.decode() for v in values}
        return state

    async def tombstone(self, room: str, seq: int) -> bool:
        return await self._replace(room, seq, "tombstone", lambda msg: msgspec.structs.replace(msg, kind="deleted", text=""))

    async def _replace(self, room: str, seq: int, what: str, change: Callable[[Msg], Msg | None]) -> bool:
        """Swap a text or /me line of ``room`` for ``change(line)`` (None: leave it), by
        compare-and-set: a line changed meanwhile is left alone. The recent list (lines
        with their seq, for dedup warm-up) follows."""
        r = self._redis
        key = self.room_key(room, "log")
        try:
            found = await r.zrangebyscore(key, seq, seq)
            if len(found) != 1:
                return False
            msg = _msg_decoder.decode(found[0])  # as the log holds it: seq 0 (the score is the seq)
            if msg.kind not in TOMBSTONED_KINDS:
                return False
            new = change(msg)
            if new is None or not await r.eval(_TOMBSTONE_LUA, 1, key, seq, found[0], encode(new)):
                return False
            if msg.cid:
                listed = (encode(msgspec.structs.replace(m, seq=seq)) for m in (msg, new))
                await r.eval(_TOMBSTONE_RECENT_LUA, 1, self._key("recent"), *listed)
            return True
        except self._aioredis.RedisError as exc:
            raise StorageUnavailable(f"Redis {what} failed: {exc}") from exc

    async def edit(self, room: str, seq: int, text: str, by: int) -> bool:
        return await self._replace(room, seq, "edit", lambda msg: None if msg.edited >= by else msgspec.structs.replace(msg, text=text, edited=by))

    async def search(
        self, text: str, limit: int, before: int = 0, room: str = "", readable: Callable[[str], bool] | None = None,
        max_bytes: int = 0,
    ) -> Found:
        """Not here: plain Redis has no full-text index (RediSearch is a module, not
        assumed). The broker answers ``not_supported``; SQLite brokers search."""
        raise SearchUnsupported("this broker keeps history in Redis, which has no full-text search")

    async def release_user(self, name: str, digest: bytes | None = None) -> bool:
        r = self._redis
        if digest is None:
            return bool(await r.hdel(self._key("users"), name))
        # Compare and delete in one step: another broker may own the name by now.
        return bool(await r.eval(RELEASE_LUA, 1, self._key("users"), name, digest))

    # ------------------------------------------------- invites and revocations

    async def add_invite(self, code: str, expires: float, now: float, limit: int) -> bool:
        try:
            return bool(await self._redis.eval(_ADD_INVITE_LUA, 1, self._key("invites"), code, repr(expires), repr(now), limit))
        except self._aioredis.RedisError as exc:
            raise StorageUnavailable(f"Redis add_invite failed: {exc}") from exc

    async def use_invite(self, code: str, now: float) -> float:
        try:
            expires = await self._redis.eval(_USE_INVITE_LUA, 1, self._key("invites"), code, repr(now))
        except self._aioredis.RedisError as exc:
            raise StorageUnavailable(f"Redis use_invite failed: {exc}") from exc
        return float(expires) if expires else 0.0

    async def invites(self, now: float) -> int:
        return int(await self._redis.zcount(self._key("invites"), f"({now!r}", "+inf"))

    async def set_revoked(self, key: bytes, revoked: bool, now: float, limit: int) -> None:
        name = self._key("revoked")
        try:
            if not revoked:
                await self._redis.zrem(name, key)
                return
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zadd(name, {key: now})
                pipe.zremrangebyrank(name, 0, -(limit + 1))  # the oldest beyond the newest ``limit``
                await pipe.execute()
        except self._aioredis.RedisError as exc:
            raise StorageUnavailable(f"Redis set_revoked failed: {exc}") from exc

    async def revoked_keys(self) -> set[bytes]:
        return set(await self._redis.zrange(self._key("revoked"), 0, -1))
