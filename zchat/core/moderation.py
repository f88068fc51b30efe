"""Private rooms and moderation, sans I/O: room settings (private, operators, bans,
invites, topic), the wire-topic tokens that make an old subscription useless, and the
actions of room operators (Moderate) and broker admins (Admin).

Why tokens: the XPUB socket cannot take back one peer's subscription, so when a room's
membership shrinks (part of a private room; kick or ban in any room) its wire topic
changes to ``#room US token NUL`` with a new token, which the broker alone publishes on
from then on. The remaining online members are told on their inboxes (Retopic, which
only they can subscribe to) and subscribe again, authorised by membership and the
current token; the Heads that follows makes them fetch what came in between. The token
comes from the shell (``new_token``): the core holds no randomness.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from zchat import protocol as p
from zchat.core.outcome import BROKER_SCOPE, Outcome
from zchat.protocol import ErrorCode as E

_LOOKER = p.LOOKER
_NAMED = ("invite", "kick", "ban", "unban", "op", "deop")  # actions on a user


class Moderation:
    """Core's room settings and moderation. Mixed into ``Core``; reads its ``roles``,
    ``private``, ``tokens``, ``topics``, ``members``, ``admins``."""

    # ------------------------------------------------------------ settings

    def _load_roles(self, state: dict[str, dict[str, set[str]]]) -> None:
        for room, roles in state.items():
            for role, values in roles.items():
                for value in values:
                    self._apply_role(room, role, value, True)

    def _apply_role(self, room: str, role: str, value: str, on: bool) -> None:
        """Change one room setting in memory (undo calls it with ``not on``)."""
        roles = self.roles.setdefault(room, {})
        values = roles.setdefault(role, set())
        if on:
            values.add(value)
        else:
            values.discard(value)
            if not values:
                del roles[role]
                if not roles:
                    del self.roles[room]
        if role == "private":
            self._set_private(room, on)
        elif role in ("released", "floor"):
            self._earlier_owner(room, role, value)

    def _set_private(self, room: str, private: bool) -> None:
        """A private room is out of the public index and its topic carries a token."""
        index = self.room_index
        i = bisect_left(index, room)
        listed = i < len(index) and index[i] == room
        if private:
            self.private.add(room)
            if listed:
                del index[i]
            if room not in self.tokens:
                self._new_topic(room)
        else:
            self.private.discard(room)
            if not listed and self.members.get(room):
                insort(index, room)

    def _earlier_owner(self, room: str, role: str, value: str) -> None:
        """Recompute what an earlier owner of a name left from the settings (a change or
        its undo): ``released`` "name ts" on the broker, ``floor`` "name:seq" on a DM."""
        sep = " " if role == "released" else ":"
        name = value.partition(sep)[0]
        marks = [v.partition(sep)[2] for v in self.role_of(room, role) if v.partition(sep)[0] == name]
        if role == "released":
            if marks:
                self.released_at[name] = max(float(m) for m in marks)
            else:
                self.released_at.pop(name, None)
        elif marks:
            self.dm_floors[(room, name)] = max(int(m) for m in marks)
        else:
            self.dm_floors.pop((room, name), None)

    def _mark_release(self, target: str, now: float, out: Outcome) -> None:
        """Whoever claims ``target`` next is a new owner: the lines of the earlier one are
        not theirs to edit, and the earlier one's DM conversations not theirs to read
        (its peers keep them). One mark per name and conversation: the latest."""
        for old in [v for v in self.role_of(BROKER_SCOPE, "released") if v.partition(" ")[0] == target]:
            self._role(BROKER_SCOPE, "released", old, False, out)
        self._role(BROKER_SCOPE, "released", f"{target} {now + self.wall_offset:.6f}", True, out)
        for room in sorted(self.rooms_of.get(target, ())):
            head = self.heads.get(room, 0)
            if p.is_dm_room(room) and head:
                for old in [v for v in self.role_of(room, "floor") if v.partition(":")[0] == target]:
                    self._role(room, "floor", old, False, out)
                self._role(room, "floor", f"{target}:{head}", True, out)

    def floor(self, name: str, room: str) -> int:
        """Lines of DM ``room`` up to this seq were an earlier owner's of ``name``: not
        ``name``'s to read (0: none)."""
        return self.dm_floors.get((room, name), 0) if self.dm_floors else 0

    def by_earlier_owner(self, name: str, line: p.Msg) -> bool:
        """``line``, sent as ``name``, was sent by an owner of the name before its release."""
        released = self.released_at.get(name)
        return released is not None and line.ts <= released

    def _role(self, room: str, role: str, value: str, on: bool, out: Outcome) -> None:
        self._apply_role(room, role, value, on)
        out.room_changes.append((room, role, value, on))

    def role_of(self, room: str, role: str) -> set[str]:
        return self.roles.get(room, {}).get(role, set())

    def topic_of(self, room: str) -> str:
        return next(iter(self.role_of(room, "topic")), "")

    def is_op(self, room: str, name: str) -> bool:
        return name in self.role_of(room, "op")

    @property
    def banned(self) -> set[str]:
        """Names banned from the broker (refused at the handshake)."""
        return self.role_of(BROKER_SCOPE, "ban")

    # ------------------------------------------------------------ topics

    def _topic(self, room: str) -> bytes:
        """The wire topic ``room`` is published on now."""
        topic = self.topics.get(room)
        if topic is None:
            topic = self.topics[room] = p.room_topic(room, self.tokens.get(room, ""))
        return topic

    def _new_topic(self, room: str) -> None:
        token = self.new_token()
        self.tokens[room] = token
        self.topics[room] = p.room_topic(room, token)

    def _rotate(self, room: str, out: Outcome) -> None:
        """Membership shrank: a new token, told to the remaining online members."""
        self._new_topic(room)
        self.count("rotations")
        event = p.Retopic(room=room, token=self.tokens[room])
        devices = self.devices
        publish = out.publish
        for name in self.members.get(room, ()):
            if name in devices:
                publish.append((p.inbox_topic(name), event))

    # ------------------------------------------------------------ access

    def _refusal(self, room: str, name: str) -> str:
        """Why ``name`` may not join ``room`` ('' if it may)."""
        if name in self.role_of(room, "ban"):
            return f"you are banned from #{room}"
        if room in self.private and name not in self.role_of(room, "invite"):
            return f"#{room} is private: ask one of its operators for an invite"
        return ""

    def _exists(self, room: str) -> bool:
        return room in self.members or room in self.heads or room in self.private

    def _remove(self, room: str, name: str, out: Outcome) -> None:
        """``name`` leaves ``room`` (after its line was sequenced): membership, op status,
        and the room's topic when that must change."""
        self._set_member(room, name, False, out)
        if self.is_op(room, name):
            self._role(room, "op", name, False, out)

    # ------------------------------------------------------------ operators

    def moderate(self, sid: str, name: str, req: p.Moderate, now: float, out: Outcome) -> None:
        """A room operator's action (broker admins may act in any room)."""
        room, action, target, text = req.room, req.action, req.name, req.text
        if not p.valid_room(room):
            out.error(sid, E.BAD_ROOM, f"bad room name {room!r}", rid=req.rid)
            return
        if not self.is_op(room, name) and name not in self.admins:
            out.error(sid, E.FORBIDDEN, f"only the operators of #{room} may {action}", rid=req.rid)
            return
        if not self._exists(room):
            out.error(sid, E.UNKNOWN_ROOM, f"no room {room!r}", rid=req.rid)
            return
        if action in _NAMED and not p.valid_name(target):
            out.error(sid, E.BAD_NAME, f"bad user name {target!r}", rid=req.rid)
            return
        if len(text) > p.MAX_TOPIC_LEN:
            out.error(sid, E.BAD_REQUEST, f"at most {p.MAX_TOPIC_LEN} characters", rid=req.rid)
            return
        members = self.members.get(room, set())
        lim = self.limits
        problem = ""
        if action == "invite":
            if target not in self.users:
                out.error(sid, E.UNKNOWN_USER, f"no user {target!r}", rid=req.rid)
                return
            if target in members:
                problem = f"{target} is in #{room} already"
            elif target in self.role_of(room, "ban"):
                problem = f"{target} is banned from #{room}: unban first"
            elif room in self.private and len(self.role_of(room, "invite")) >= lim.max_invites:
                out.error(sid, E.LIMIT_REACHED, f"#{room} has {lim.max_invites} open invites, the most allowed", rid=req.rid)
                return
        elif action in ("kick", "op") and target not in members:
            out.error(sid, E.NOT_MEMBER, f"{target} is not in #{room}", rid=req.rid)
            return
        elif action == "ban":
            if target in self.role_of(room, "ban"):
                problem = f"{target} is banned from #{room} already"
            elif len(self.role_of(room, "ban")) >= lim.max_bans:
                out.error(sid, E.LIMIT_REACHED, f"#{room} has {lim.max_bans} bans, the most allowed", rid=req.rid)
                return
        elif action == "unban" and target not in self.role_of(room, "ban"):
            problem = f"{target} is not banned from #{room}"
        elif action == "op":
            if self.is_op(room, target):
                problem = f"{target} is an operator of #{room} already"
            elif len(self.role_of(room, "op")) >= lim.max_ops:
                out.error(sid, E.LIMIT_REACHED, f"#{room} has {lim.max_ops} operators, the most allowed", rid=req.rid)
                return
        elif action == "deop" and not self.is_op(room, target):
            problem = f"{target} is not an operator of #{room}"
        if problem:
            out.error(sid, E.BAD_REQUEST, problem, rid=req.rid)
            return
        if not self._moderation_budget(sid, name, now, out, req.rid):
            return
        if not self._line_budget(sid, name, room, now, out, rid=req.rid):
            return
        topics = [self._topic(room)]
        if action in ("invite", "kick", "ban"):
            topics.append(p.inbox_topic(target))  # told even when not (or no longer) subscribed
        self._sequence(room, name, text, action, "" if action == "topic" else target, "", now, out, *topics)
        if action == "invite":
            if room in self.private:
                self._role(room, "invite", target, True, out)
        elif action == "kick":
            self._remove(room, target, out)
            self._rotate(room, out)
        elif action == "ban":
            self._role(room, "ban", target, True, out)
            if target in self.role_of(room, "invite"):
                self._role(room, "invite", target, False, out)
            if target in members:
                self._remove(room, target, out)
                self._rotate(room, out)
        elif action == "unban":
            self._role(room, "ban", target, False, out)
        elif action == "topic":
            old = self.topic_of(room)
            if old:
                self._role(room, "topic", old, False, out)
            if text:
                self._role(room, "topic", text, True, out)
        else:
            self._role(room, "op", target, action == "op", out)
        out.changed.append(len(out.replies))
        out.replies.append((sid, p.Ok(rid=req.rid)))

    # ------------------------------------------------------------ admins

    def admin(self, sid: str, name: str, req: p.Admin, now: float, out: Outcome) -> None:
        """A broker admin's action: ban/unban a name, release a name, delete a line."""
        if name not in self.admins:
            out.error(sid, E.FORBIDDEN, f"only the broker's admins may {req.action}", rid=req.rid)
            return
        action, target = req.action, req.name
        if action == "delete":
            self._delete(sid, name, req, now, out)
            return
        if not p.valid_name(target):
            out.error(sid, E.BAD_NAME, f"bad user name {target!r}", rid=req.rid)
            return
        banned = self.banned
        if action == "ban":
            if target in banned:
                out.error(sid, E.BAD_REQUEST, f"{target} is banned already", rid=req.rid)
                return
            if len(banned) >= self.limits.max_broker_bans:
                out.error(sid, E.LIMIT_REACHED, f"{self.limits.max_broker_bans} names banned, the most allowed", rid=req.rid)
                return
            if not self._moderation_budget(sid, name, now, out, req.rid):
                return
            self._role(BROKER_SCOPE, "ban", target, True, out)
            self._end_sessions(target, now, out)
        elif action == "unban":
            if target not in banned:
                out.error(sid, E.BAD_REQUEST, f"{target} is not banned", rid=req.rid)
                return
            if not self._moderation_budget(sid, name, now, out, req.rid):
                return
            self._role(BROKER_SCOPE, "ban", target, False, out)
        else:  # release
            if target not in self.users:
                out.error(sid, E.UNKNOWN_USER, f"no user {target!r}", rid=req.rid)
                return
            if not self._moderation_budget(sid, name, now, out, req.rid):
                return
            # Whoever claims the name next must inherit none of its rooms, lines or DMs.
            self._mark_release(target, now, out)
            for room in sorted(self.rooms_of.get(target, ())):
                if p.is_dm_room(room):
                    self._set_member(room, target, False, out)
                    continue
                self._sequence(room, name, "name released by a broker admin", "kick", target, "", now, out, self._topic(room))
                self._remove(room, target, out)
                self._rotate(room, out)
            for room in [r for r, roles in self.roles.items() if target in roles.get("op", ()) or target in roles.get("invite", ())]:
                for role in ("op", "invite"):
                    if target in self.role_of(room, role):
                        self._role(room, role, target, False, out)
            self._end_sessions(target, now, out)
            self.release_user(target)
            out.released.append(target)
        out.changed.append(len(out.replies))
        out.replies.append((sid, p.Ok(rid=req.rid)))

    def _end_sessions(self, target: str, now: float, out: Outcome) -> None:
        """Close every session of ``target``; the shell cuts its connections too."""
        for session in list(self.devices.get(target, ())):
            self._close_session(session, now, out)
        out.cut.append(target)

    def _delete(self, sid: str, name: str, req: p.Admin, now: float, out: Outcome) -> None:
        room, seq = req.room, req.seq
        peers = p.dm_peers(room)
        if peers is None and not p.valid_room(room):
            out.error(sid, E.BAD_ROOM, f"bad room name {room!r}", rid=req.rid)
            return
        if not 1 <= seq <= self.heads.get(room, 0):
            out.error(sid, E.BAD_REQUEST, f"{room!r} has no line {seq}", rid=req.rid)
            return
        if not self._moderation_budget(sid, name, now, out, req.rid):
            return
        if peers is not None:
            topics = tuple(dict.fromkeys(p.inbox_topic(peer) for peer in peers))
        else:
            topics = (self._topic(room),)
        self._sequence(room, name, str(seq), "delete", "", "", now, out, *topics, ref=seq)
        out.tombstones.append((room, seq))
        out.changed.append(len(out.replies))
        out.replies.append((sid, p.Ok(rid=req.rid)))
