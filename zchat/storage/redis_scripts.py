"""The Lua scripts of the Redis store, each one atomic on the server.

Every key a script touches belongs to one room and carries the room in a hash tag
(``PREFIX{room}:log``), so one room's keys live on one Redis Cluster shard and a script
never spans two. The keys of a room:

- ``{room}:log``      sorted set, score = seq, member = the encoded Msg (its seq field 0:
                      the score is the seq)
- ``{room}:head``     the highest seq given out (never lowered, also after pruning)
- ``{room}:members``  set of member names
- ``{room}:cids``     hash "sender cid" -> "seq id ts" of the room's recent lines
- ``{room}:cidq``     list of those fields, newest first, to cap the hash
"""

from __future__ import annotations

# SEQUENCE: the several-broker engine's write. One call per room per broker turn.
# KEYS: log, head, members, cids, cidq.
# ARGV: 1 channels (space-separated PUBLISH targets), 2 origin broker id, 3 cid cap,
#       4 message count n, 5 events channel, 6 room, then per message (dedup field or "", id,
#       ts, body), then per membership change (name, "1" join / "0" leave).
# Returns {head, r1..rn}: ri is the new seq (an integer) of message i, or the
# "seq id ts" string stored for its (sender, cid) by an earlier call (a duplicate:
# nothing stored). New messages are PUBLISHed in one payload per channel:
# origin "\n" then, per message, seq " " byte length "\n" body.
SEQUENCE_LUA = """
local channels, origin, cap, n, events, room = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local head = tonumber(redis.call('GET', KEYS[2]) or '0')
local result = {0}
local parts = {origin, '\\n'}
local fresh = 0
local a = 6
for i = 1, n do
    local field, id, ts, body = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
    a = a + 4
    local old = false
    if field ~= '' then
        old = redis.call('HGET', KEYS[4], field)
    end
    if old then
        result[i + 1] = old
    else
        head = head + 1
        redis.call('ZADD', KEYS[1], head, body)
        if field ~= '' then
            redis.call('HSET', KEYS[4], field, head .. ' ' .. id .. ' ' .. ts)
            if redis.call('LPUSH', KEYS[5], field) > cap then
                redis.call('HDEL', KEYS[4], redis.call('RPOP', KEYS[5]))
            end
        end
        parts[#parts + 1] = head .. ' ' .. #body .. '\\n'
        parts[#parts + 1] = body
        fresh = fresh + 1
        result[i + 1] = head
    end
end
redis.call('SET', KEYS[2], head)
result[1] = head
while a + 2 <= #ARGV do
    local name, flag = ARGV[a + 1], ARGV[a + 2]
    a = a + 2
    if flag == '1' then
        redis.call('SADD', KEYS[3], name)
    else
        redis.call('SREM', KEYS[3], name)
    end
    redis.call('PUBLISH', events, 'm ' .. origin .. ' ' .. room .. ' ' .. name .. ' ' .. flag)
end
if fresh > 0 then
    local payload = table.concat(parts)
    for channel in string.gmatch(channels, '%S+') do
        redis.call('PUBLISH', channel, payload)
    end
end
return result
"""

# APPEND: the Storage interface's write, seqs given by the caller (one Redis server:
# the keys may span rooms). KEYS: n log keys, n head keys, then one members key per
# change. ARGV: n, then (seq, body) per message, then (name, "1"/"0") per change.
# Returns 0 when stored, else the 1-based index of the first duplicate (room, seq);
# then nothing was written.
APPEND_LUA = """
local n = tonumber(ARGV[1])
local seen = {}
for i = 1, n do
    local key, seq = KEYS[i], ARGV[2 * i]
    seen[key] = seen[key] or {}
    if seen[key][seq] or redis.call('ZCOUNT', key, seq, seq) > 0 then
        return i
    end
    seen[key][seq] = true
end
for i = 1, n do
    local seq = tonumber(ARGV[2 * i])
    redis.call('ZADD', KEYS[i], seq, ARGV[2 * i + 1])
    if seq > tonumber(redis.call('GET', KEYS[n + i]) or '0') then
        redis.call('SET', KEYS[n + i], seq)
    end
end
local a = 2 * n + 1
for j = 2 * n + 1, #KEYS do
    local name, flag = ARGV[a + 1], ARGV[a + 2]
    a = a + 2
    if flag == '1' then
        redis.call('SADD', KEYS[j], name)
    else
        redis.call('SREM', KEYS[j], name)
    end
end
return 0
"""

# RELEASE: compare and delete a claimed name (another broker may own it by now).
RELEASE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""
