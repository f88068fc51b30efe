"""A sender changing their own line (sans I/O): ``edit`` and ``delete``. Only storage
knows who sent an old line, so this is two steps: ``edit_request`` checks what it can
(the room, the seq, the budget) and asks the shell for the line (an EditQuery); the
shell reads it and calls ``edit_found``, which checks the sender and sequences the
``edit`` or ``delete`` line. A delete reuses the admins' machinery (a delete line and a
tombstone); an edit asks storage to replace the line's text after the batch is stored."""

from __future__ import annotations

from typing import TYPE_CHECKING

from zchat import protocol as p
from zchat.core.outcome import EditQuery
from zchat.protocol import ErrorCode as E

if TYPE_CHECKING:
    from zchat.core.outcome import Outcome

#: The kinds of line a sender may edit or delete.
EDITABLE = ("text", "me")


class Edits:
    """The core's side of edit and delete (a mixin of Core)."""

    def edit_request(self, sid: str, name: str, req: p.Edit | p.Delete, now: float, out: Outcome) -> None:
        verb = "edit" if isinstance(req, p.Edit) else "delete"
        room, rid = req.room, req.rid
        if name == p.LOOKER:
            out.error(sid, E.FORBIDDEN, f"sign in with a name to {verb} lines", rid=rid)
            return
        peers = p.dm_peers(room)
        if peers is None and not p.valid_room(room):
            out.error(sid, E.BAD_ROOM, f"bad room name {room!r}", rid=rid)
            return
        if name not in self.members.get(room, ()) and (peers is None or name not in peers):
            out.error(sid, E.NOT_MEMBER, f"only members of {room!r} may {verb} its lines", rid=rid)
            return
        if not 1 <= req.seq <= self.heads.get(room, 0):
            out.error(sid, E.BAD_REQUEST, f"{room!r} has no line {req.seq}", rid=rid)
            return
        if isinstance(req, p.Edit):
            if not req.text or req.text.isspace():
                out.error(sid, E.BAD_REQUEST, "empty message: delete the line instead", rid=rid)
                return
            if len(req.text.encode()) > self.limits.max_bytes:
                out.error(sid, E.TOO_LARGE, f"the new text is over {self.limits.max_bytes} bytes", rid=rid)
                return
        if not self._line_budget(sid, name, room, now, out, rid=rid):
            return
        out.queries.append(EditQuery(sid, req, name))

    def edit_found(self, query: EditQuery, original: p.Msg | None, now: float, out: Outcome) -> None:
        """The shell read line ``query.request.seq`` (None: not stored): finish the edit."""
        sid, req, name = query.sid, query.request, query.name
        verb = "edit" if isinstance(req, p.Edit) else "delete"
        if original is None or original.kind not in EDITABLE:
            out.error(sid, E.BAD_REQUEST, f"line {req.seq} of {req.room!r} is not a text line (or is deleted): nothing to {verb}", rid=req.rid)
            return
        if original.sender != name:
            out.error(sid, E.FORBIDDEN, f"only its sender may {verb} a line", rid=req.rid)
            return
        if self.by_earlier_owner(name, original):
            out.error(sid, E.FORBIDDEN, f"that line is by an earlier owner of the name {name!r}: not yours to {verb}", rid=req.rid)
            return
        peers = p.dm_peers(req.room)
        if peers is not None:
            topics = tuple(dict.fromkeys(p.inbox_topic(peer) for peer in peers))
        elif name in self.members.get(req.room, ()):
            topics = (self._topic(req.room),)
        else:
            out.error(sid, E.NOT_MEMBER, f"only members of {req.room!r} may {verb} its lines", rid=req.rid)
            return
        if isinstance(req, p.Edit):
            stored = self._sequence(req.room, name, req.text, "edit", "", "", now, out, *topics, ref=req.seq)
            out.edits.append((req.room, req.seq, req.text, stored.seq))
        else:
            self._sequence(req.room, name, str(req.seq), "delete", "", "", now, out, *topics, ref=req.seq)
            out.tombstones.append((req.room, req.seq))
        out.changed.append(len(out.replies))
        out.replies.append((sid, p.Ok(rid=req.rid)))
