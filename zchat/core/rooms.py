"""Rooms and membership, sans I/O: join and part, member and room pages, the rooms
cap, who may read or subscribe to what, and history requests."""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort

import msgspec

from zchat import protocol as p
from zchat.core.outcome import HistoryQuery, Outcome
from zchat.protocol import ErrorCode as E

_LOOKER = p.LOOKER

# Upper bounds of the encoded size of one list item (a msgpack map: keys, headers and
# the largest ints), plus the name's bytes: pages are cut to fit MAX_REPLY_BYTES.
_MEMBER_BYTES = 32
_ROOMINFO_BYTES = 60
_REPLY_SLACK = 1024  # the reply's own fields (rid, room, more, tags)


class Rooms:
    """Core's rooms and members. Mixed into ``Core``; reads its ``members``,
    ``rooms_of``, ``room_index``, ``online_in`` and ``heads``."""

    # ------------------------------------------------------------ queries

    def member_list(self, room: str) -> list[p.Member]:
        """Every member of ``room``, by name (tests and small rooms; replies use member_page)."""
        ops = self.role_of(room, "op")
        return [p.Member(name, self.online(name), name in ops) for name in sorted(self.members.get(room, ()))]

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
        devices, elsewhere = self.devices, self.elsewhere
        ops = self.role_of(room, "op")
        page: list[p.Member] = []
        budget = p.MAX_REPLY_BYTES - _REPLY_SLACK
        for name in index[start:start + self.limits.page_size]:
            budget -= len(name) + _MEMBER_BYTES  # names are ASCII
            if budget < 0:
                break
            page.append(p.Member(name, bool(devices.get(name)) or name in elsewhere, name in ops))
        return page, start + len(page) < len(index)

    def room_page(self, after: str = "", name: str = "") -> tuple[list[p.RoomInfo], bool]:
        """Public rooms, and the private rooms ``name`` is in, named after ``after``: at
        most a page and MAX_REPLY_BYTES; and whether more follow. Public rooms page from a
        sorted index with bisect (no sort per request); the asker's private rooms (at most
        max_rooms) are merged in."""
        index = self.room_index
        start = bisect_right(index, after) if after else 0
        size = self.limits.page_size
        mine = sorted(r for r in self.rooms_of.get(name, ()) if r in self.private and r > after) if self.private else []
        members, online_in, private = self.members, self.online_in, self.private
        page: list[p.RoomInfo] = []
        budget = p.MAX_REPLY_BYTES - _REPLY_SLACK
        for room in heapq.merge(index[start:start + size], mine[:size]):
            budget -= len(room) + _ROOMINFO_BYTES
            if budget < 0 or len(page) >= size:
                break
            page.append(p.RoomInfo(room, len(members[room]), online_in.get(room, 0), room in private))
        return page, len(page) < len(index) - start + len(mine)

    def room_list(self) -> list[p.RoomInfo]:
        """Every public room (tests; replies use room_page)."""
        return [p.RoomInfo(room, len(self.members[room]), self.online_in.get(room, 0)) for room in self.room_index]

    # ------------------------------------------------------------ subscriptions

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
        # A room: its members, on its current topic only (an old token is refused).
        return name in self.members.get(target, ()) and p.topic_token(topic) == self.tokens.get(target, "")

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

    # ------------------------------------------------------------ membership

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
        room = req.room
        if not p.valid_room(room):
            out.error(sid, E.BAD_ROOM, f"bad room name {room!r}: use a-z, 0-9, '_', '-', '.' (max {p.MAX_ROOM_LEN})", rid=req.rid)
            return
        changed = name not in self.members.get(room, ())
        creating = not self._exists(room)
        if req.private and not creating and (changed or room not in self.private):
            out.error(sid, E.FORBIDDEN, f"#{room} exists already: a private room is made new", rid=req.rid)
            return
        if changed:
            refusal = self._refusal(room, name)
            if refusal:
                out.error(sid, E.FORBIDDEN, refusal, rid=req.rid)
                return
            if not self._room_cap(sid, name, out, rid=req.rid):
                return
            if not self._line_budget(sid, name, room, now, out, rid=req.rid):
                return
            if creating and req.private:
                self._role(room, "private", "1", True, out)
            if name in self.role_of(room, "invite"):
                self._role(room, "invite", name, False, out)
            if not self.members.get(room) and not self.role_of(room, "op"):
                self._role(room, "op", name, True, out)  # whoever opens an empty room runs it
            self._set_member(room, name, True, out)
            self._sequence(room, name, "", "join", "", "", now, out, self._topic(room))
            out.changed.append(len(out.replies))
        members, _ = self.member_page(room)  # the first page: `who` pages on from its last name
        out.replies.append(
            (sid, p.Joined(
                rid=req.rid, room=room, head=self.heads.get(room, 0), epoch=self.epoch, members=members,
                token=self.tokens.get(room, ""), private=room in self.private, topic=self.topic_of(room),
            ))
        )

    def _part(self, sid: str, name: str, req: p.Part, now: float, out: Outcome) -> None:
        if name not in self.members.get(req.room, ()):
            out.error(sid, E.NOT_MEMBER, f"you are not in {req.room!r}", rid=req.rid)
            return
        if p.is_dm_room(req.room):
            self._set_member(req.room, name, False, out)
        else:
            if not self._line_budget(sid, name, req.room, now, out, rid=req.rid):
                return
            self._sequence(req.room, name, "", "part", "", "", now, out, self._topic(req.room))
            self._remove(req.room, name, out)
            if req.room in self.private:  # a public room is anyone's to read: no new topic
                self._rotate(req.room, out)
        out.changed.append(len(out.replies))
        out.replies.append((sid, p.Ok(rid=req.rid)))

    def _set_member(self, room: str, name: str, member: bool, out: Outcome) -> None:
        self._apply_member(room, name, member)
        out.members.append((room, name, member))

    def _apply_member(self, room: str, name: str, member: bool) -> None:
        """Change membership in memory with every index that follows it (a change, never
        a no-op: callers check first, and undo reverts changes in reverse order)."""
        online = name in self.devices or name in self.elsewhere
        index = self._member_index.get(room)
        if member:
            names = self.members.get(room)
            if names is None:
                names = self.members[room] = set()
                if not p.is_dm_room(room) and room not in self.private:
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
        """Public rooms are readable by anyone; a private room by its members; a DM
        conversation by its two users."""
        peers = p.dm_peers(room)
        if peers is not None:
            if name not in peers:
                out.error(sid, E.NOT_MEMBER, "that conversation is not yours", rid=rid)
                return False
        elif not p.valid_room(room):
            out.error(sid, E.BAD_ROOM, f"bad room name {room!r}", rid=rid)
            return False
        elif room in self.private and name not in self.members.get(room, ()):
            out.error(sid, E.FORBIDDEN, f"#{room} is private: only its members may read it", rid=rid)
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
        floor = self.floor(name, req.room)
        if floor and req.after >= 0 and req.after < floor:  # oldest first: start past the floor
            req = msgspec.structs.replace(req, after=floor)
        out.queries.append(HistoryQuery(sid, req, self.heads.get(req.room, 0), floor))
