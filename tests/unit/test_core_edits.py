"""Edit and delete in the core, with plain values: the first step checks what the core
knows, the second (given the stored line) checks its sender and sequences the change."""

from __future__ import annotations

from tests.unit.test_core_moderation import error, private_room, request
from zchat import protocol as p
from zchat.core import EditQuery, Outcome
from zchat.protocol import ErrorCode as E


def line(core, sender: str = "bob", seq: int = 0, kind: str = "text") -> p.Msg:  # type: ignore[no-untyped-def]
    return p.Msg(room="sec", seq=seq or core.heads["sec"], id="x", ts=0.0, sender=sender, text="old", kind=kind)  # type: ignore[arg-type]


def test_an_edit_is_checked_in_two_steps() -> None:
    core = private_room("bob")
    seq = core.heads["sec"]
    body = p.Edit(rid=9, room="sec", seq=seq, text="new")
    out = request(core, "s-bob", "bob", body)
    assert out.queries == [EditQuery("s-bob", body, "bob")] and not out.store
    done = Outcome()
    core.edit_found(out.queries[0], line(core), 1.0, done)
    edit = done.store[0]
    assert (edit.kind, edit.ref, edit.text, edit.sender, edit.seq) == ("edit", seq, "new", "bob", seq + 1)
    assert done.edits == [("sec", seq, "new", seq + 1)] and done.publish[0][0] == p.room_topic("sec", core.tokens["sec"])
    assert isinstance(done.replies[0][1], p.Ok)
    for original, code in ((line(core, "alice"), E.FORBIDDEN), (line(core, kind="join"), E.BAD_REQUEST), (None, E.BAD_REQUEST)):
        refused = Outcome()
        core.edit_found(out.queries[0], original, 1.0, refused)
        assert error(refused).code == code and not refused.edits


def test_what_the_core_refuses_at_once() -> None:
    core = private_room("bob")
    seq = core.heads["sec"]
    assert error(request(core, "s-dave", "dave", p.Edit(rid=9, room="sec", seq=seq, text="x"))).code == E.NOT_MEMBER
    assert error(request(core, "s-bob", "bob", p.Edit(rid=9, room="sec", seq=seq + 5, text="x"))).code == E.BAD_REQUEST
    assert error(request(core, "s-bob", "bob", p.Edit(rid=9, room="sec", seq=seq, text=" "))).code == E.BAD_REQUEST
    assert error(request(core, "s-bob", "bob", p.Delete(rid=9, room="#bad", seq=1))).code == E.BAD_ROOM
    assert error(request(core, "s-x", p.LOOKER, p.Delete(rid=9, room="sec", seq=1))).code in (E.FORBIDDEN, E.NO_SESSION)


def test_a_delete_is_a_delete_line_and_a_tombstone() -> None:
    core = private_room("bob")
    seq = core.heads["sec"]
    out = request(core, "s-bob", "bob", p.Delete(rid=9, room="sec", seq=seq))
    done = Outcome()
    core.edit_found(out.queries[0], line(core), 1.0, done)
    assert (done.store[0].kind, done.store[0].ref, done.store[0].text) == ("delete", seq, str(seq))
    assert done.tombstones == [("sec", seq)]
    core.undo(done)  # storage refused the batch: no tombstone, no edit, an error instead of ok
    assert done.tombstones == [] and done.edits == [] and isinstance(done.replies[0][1], p.Error)
