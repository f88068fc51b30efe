"""A line's way from the users' Clients to their tabs (zchat.web.wire.Shared), measured
in session 4 (docs/web.md): a broker's big batch is encoded once for a room's users too."""

from __future__ import annotations

import msgspec

from zchat import protocol as p
from zchat.bench import common
from zchat.web import wire


def test_a_big_batch_is_encoded_once_for_every_user() -> None:
    """256 lines a broker published at once (it fell behind): about 50 KB of frames. Were
    they encoded per user, every user of the room would pay for them just when the
    gateway is behind already."""
    shared = wire.Shared()
    batch = [p.Msg(room="general", seq=i, id=f"m{i}", ts=1.0, sender="sender", text=common.text(0, i), epoch="e") for i in range(1, 257)]
    first = wire.events(shared, batch)
    assert sum(len(data) for data, _ in first) > 32 * 1024  # over 1/64 of the default budget
    again = [msgspec.structs.replace(msg) for msg in batch]  # another user's Client: equal lines, its own
    assert wire.events(shared, again) is first
    changed = [*batch[:100], p.Msg(room="general", seq=101, id="m101", ts=1.0, sender="sender", text="not the same", epoch="e"), *batch[101:]]
    other = wire.events(shared, changed)
    assert other is not first and b"not the same" in b"".join(data for data, _ in other)
