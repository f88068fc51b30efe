"""History, users and memberships in Redis, so several brokers can share one store.

Layout (every key starts with ``prefix``):

- ``room:{room}``     sorted set, score = seq, member = MessagePack-encoded Msg
- ``heads``           hash room -> highest seq
- ``recent``          list of encoded Msgs that carry a cid, newest first, capped
- ``epoch``           string, set once with SET NX (renewed after a lossy Redis restart)
- ``run``             the Redis server's run id at the last open (to notice a restart)
- ``users``           hash name -> digest, claimed with HSETNX (first owner wins)
- ``members:{room}``  set of names; ``rooms`` is the set of rooms that have members
- ``invites``         sorted set, score = expiry (wall-clock), member = an unused invite code
- ``revoked``         sorted set, score = when, member = a revoked raw public key
- ``role:{role}:{room}`` set of a room setting's values; ``roles`` the set of
  ``role NUL room`` that have any (see Storage.change_rooms)

``append`` is one Lua script, so it is atomic across brokers and refuses a duplicate
(room, seq) before writing anything. Durability is the Redis server's: run it with
``appendonly yes`` (and ``appendfsync always`` to survive power loss).
The redis package is imported lazily: zchat runs without the ``redis`` extra.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any, Sequence

import msgspec

from zchat.protocol import Msg, encode
from zchat.storage.base import TOMBSTONED_KINDS, MemberChange, Page, RoomChange, StorageError, StorageUnavailable, msg_bytes

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

#: How many cid-carrying messages ``recent`` can return (the dedup warm-up window).
RECENT_CAP = 10_000

# KEYS: heads, recent, rooms, then one room key per message, then one members key per
# membership change. ARGV: recent cap, message count n, then (room, seq, encoded msg,
# has-cid "1"/"0") per message, then (room, name, "1" join / "0" leave) per change.
# Returns 0 when stored, else the 1-based index of the first duplicate message.
_APPEND_LUA = """
local n = tonumber(ARGV[2])
local seen = {}
for i = 1, n do
    local key, seq = KEYS[i + 3], ARGV[4 * i]
    seen[key] = seen[key] or {}
    if seen[key][seq] or redis.call('ZCOUNT', key, seq, seq) > 0 then
        return i
    end
    seen[key][seq] = true
end
local pushed = false
for i = 1, n do
    local room, seq, body = ARGV[4 * i - 1], tonumber(ARGV[4 * i]), ARGV[4 * i + 1]
    redis.call('ZADD', KEYS[i + 3], seq, body)
    local head = tonumber(redis.call('HGET', KEYS[1], room) or '0')
    if seq > head then
        redis.call('HSET', KEYS[1], room, seq)
    end
    if ARGV[4 * i + 2] == '1' then
        redis.call('LPUSH', KEYS[2], body)
        pushed = true
    end
end
if pushed then
    redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[1]) - 1)
end
for j = 1, #KEYS - 3 - n do
    local key, base = KEYS[3 + n + j], 2 + 4 * n + 3 * (j - 1)
    local room, name = ARGV[base + 1], ARGV[base + 2]
    if ARGV[base + 3] == '1' then
        redis.call('SADD', key, name)
        redis.call('SADD', KEYS[3], room)
    else
        redis.call('SREM', key, name)
        if redis.call('SCARD', key) == 0 then
            redis.call('SREM', KEYS[3], room)
        end
    end
end
return 0
"""

# KEYS: members:{room}, rooms. ARGV: name, room. Drops the room once nobody is left.
_LEAVE_LUA = """
redis.call('SREM', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) == 0 then
    redis.call('SREM', KEYS[2], ARGV[2])
end
return 0
"""

# Our own decoder: protocol.decode_event enforces the wire size limit, which a stored
# Msg (a near-limit Send plus seq, id, ts, sender) may legitimately exceed.
_msg_decoder = msgspec.msgpack.Decoder(Msg)


_RELEASE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


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

# KEYS: room:{room}, recent. ARGV: seq, the stored body, its tombstone. Replaces the
# body only if it is still the one read (compare and set), in the recent list too.
_TOMBSTONE_LUA = """
local found = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])
if #found ~= 1 or found[1] ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
local at = redis.call('LPOS', KEYS[2], ARGV[2])
if at then redis.call('LSET', KEYS[2], at, ARGV[3]) end
return 1
"""


def _page(bodies: list[bytes], max_bytes: int) -> Page:
    """Decoded messages within max_bytes (at least one), in the order given."""
    page = Page()
    size = 0
    for body in bodies:
        msg = _msg_decoder.decode(body)
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
    """The Storage interface on a Redis server (see zchat.storage.base)."""

    def __init__(self, url: str, prefix: str = "zchat:") -> None:
        self._aioredis = _import_redis()
        self.url = url
        self.prefix = prefix
        self.epoch = ""
        self._client: Redis | None = None
        self._append_script: Any = None
        self._leave_script: Any = None

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> str:
        client = self._aioredis.from_url(self.url)
        try:
            await client.ping()
            await self._new_epoch_if_rolled_back(client)
            await client.set(self._key("epoch"), secrets.token_hex(8), nx=True)
            epoch = await client.get(self._key("epoch"))
        except self._aioredis.RedisError as exc:
            await client.aclose()
            raise StorageError(f"cannot use Redis at {self.url}: {exc}") from exc
        self._client = client
        self._append_script = client.register_script(_APPEND_LUA)
        self._leave_script = client.register_script(_LEAVE_LUA)
        self.epoch = epoch.decode()
        log.info("opened Redis history %s prefix %r (epoch %s)", self.url, self.prefix, self.epoch)
        return self.epoch

    async def _new_epoch_if_rolled_back(self, client: Any) -> None:
        """A Redis server that restarted may have lost its last writes (AOF ``everysec``
        loses up to a second; no persistence loses all): new messages would then reuse
        seqs clients saw. So unless it fsyncs every write (``appendfsync always``), a
        server with another run id than at our last open starts a new epoch. Costs
        nothing per message; a Redis restart costs clients a fresh start."""
        info = await client.info("server")
        run_id = str(info.get("run_id", ""))
        try:
            fsync = (await client.config_get("appendfsync")).get("appendfsync", "")
            aof = (await client.config_get("appendonly")).get("appendonly", "")
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
        (room, seq) stores none."""
        if not messages and not members:
            return
        client = self._redis
        keys = [self._key("heads"), self._key("recent"), self._key("rooms")]
        args: list[str | int | bytes] = [RECENT_CAP, len(messages)]
        for m in messages:
            body = encode(msgspec.structs.replace(m, epoch="") if m.epoch else m)
            keys.append(self._key("room", m.room))
            args += [m.room, m.seq, body, "1" if m.cid else "0"]
        for room, name, member in members:
            keys.append(self._key("members", room))
            args += [room, name, "1" if member else "0"]
        try:
            duplicate = await self._append_script(keys=keys, args=args, client=client)
        except self._aioredis.RedisError as exc:  # unreachable, OOM (maxmemory), MISCONF (a failing BGSAVE)
            raise StorageUnavailable(f"Redis append failed: {exc}") from exc
        if duplicate:
            m = messages[duplicate - 1]
            raise StorageError(
                f"refused {len(messages)} messages: (room, seq) ({m.room!r}, {m.seq}) already stored"
            )

    async def heads(self) -> dict[str, int]:
        raw = await self._redis.hgetall(self._key("heads"))
        return {room.decode(): int(seq) for room, seq in raw.items()}

    async def range(self, room: str, after: int, limit: int, before: int = 0, max_bytes: int = 0) -> Page:
        if limit <= 0:
            return Page()
        upper = f"({before}" if before > 0 else "+inf"
        raw = await self._redis.zrangebyscore(self._key("room", room), f"({after}", upper, start=0, num=limit)
        return _page(raw, max_bytes)

    async def last(self, room: str, limit: int, before: int = 0, max_bytes: int = 0) -> Page:
        if limit <= 0:
            return Page()
        upper = f"({before}" if before > 0 else "+inf"
        raw = await self._redis.zrevrangebyscore(self._key("room", room), upper, "-inf", start=0, num=limit)
        page = _page(raw, max_bytes)
        page.reverse()
        return page

    async def prune(self, room: str, keep: int = 0, before_ts: float = 0.0, batch: int = 500) -> int:
        """Delete a batch of room's oldest messages past retention (see Storage.prune).

        Reads the oldest ``batch`` entries, picks the highest seq that may go, then
        ZREMRANGEBYSCORE up to it: by score, not rank, so brokers pruning the same room at
        once never remove more than retention allows. ``heads`` is kept apart, so the
        head survives anyway; the newest message stays too, as with SQLite.
        """
        if batch <= 0 or (keep <= 0 and before_ts <= 0):
            return 0
        r = self._redis
        key = self._key("room", room)
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
        first = await self._redis.zrange(self._key("room", room), 0, 0, withscores=True)
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
                pipe.smembers(self._key("members", room))
            sets = await pipe.execute()
        return {room: {n.decode() for n in names} for room, names in zip(rooms, sets) if names}

    async def set_member(self, room: str, name: str, member: bool) -> None:
        r = self._redis
        if member:
            async with r.pipeline(transaction=True) as pipe:
                pipe.sadd(self._key("members", room), name)
                pipe.sadd(self._key("rooms"), room)
                await pipe.execute()
        else:
            await self._leave_script(keys=[self._key("members", room), self._key("rooms")], args=[name, room])

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
        r = self._redis
        key = self._key("room", room)
        try:
            found = await r.zrangebyscore(key, seq, seq)
            if len(found) != 1:
                return False
            msg = _msg_decoder.decode(found[0])
            if msg.kind not in TOMBSTONED_KINDS:
                return False
            stone = encode(msgspec.structs.replace(msg, kind="deleted", text=""))
            return bool(await r.eval(_TOMBSTONE_LUA, 2, key, self._key("recent"), seq, found[0], stone))
        except self._aioredis.RedisError as exc:
            raise StorageUnavailable(f"Redis tombstone failed: {exc}") from exc

    async def release_user(self, name: str, digest: bytes | None = None) -> bool:
        r = self._redis
        if digest is None:
            return bool(await r.hdel(self._key("users"), name))
        # Compare and delete in one step: another broker may own the name by now.
        return bool(await r.eval(_RELEASE_LUA, 1, self._key("users"), name, digest))

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
