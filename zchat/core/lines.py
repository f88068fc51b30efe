"""Chat lines, sans I/O: ``Core.send``, the broker's hot path (one call per line), and
the check that a DM conversation may gain its members."""

from __future__ import annotations

from zchat import protocol as p
from zchat.core.limits import LINE_TOKEN_BYTES, TokenBucket, line_cost
from zchat.core.outcome import Outcome
from zchat.core.sequence import _HEX2, _ack, _Entry
from zchat.core.sessions import _LOOKER, _MAX_CID_LEN, valid_sid
from zchat.protocol import ErrorCode as E

# Core.send reads these as module globals: cheaper than an attribute of ``p`` per line.
_Msg = p.Msg
_ONE_TOKEN_CHARS = LINE_TOKEN_BYTES // 4  # a text this short costs one token whatever its characters
_Stored = p.Stored


class Lines:
    """Core's chat lines. Mixed into ``Core``: send reads its state straight from the
    instance (sessions, members, buckets, dedup), inlining the other parts' steps."""

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
                topic = self._topic(room)
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
            cost = 1.0 if len(text) <= _ONE_TOKEN_CHARS else line_cost(text, burst)
            wait = bucket.take(rate, burst, now, cost)
            if wait:
                self._rate_limited(sid, cid, wait, out, cost=cost)
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
                    room_cost = min(cost, room_burst)
                    if tokens >= room_cost:
                        room_bucket.tokens = tokens - room_cost
                    else:
                        room_bucket.tokens = tokens
                        bucket.tokens += cost  # the line was not taken: the user keeps its tokens
                        self._room_limited(sid, room, cid, (room_cost - tokens) / room_rate, out, cost=cost)
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
