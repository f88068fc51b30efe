"""The gateway benchmark's tab reader finds the sender's lines in a live frame's bytes
(zchat.bench.gateway.stamps) rather than decoding every frame for every tab: it must
count exactly the sender's lines, in frames the gateway really makes (zchat.web.wire)."""

from __future__ import annotations

import json

from zchat import protocol as p
from zchat.bench import common
from zchat.bench.gateway import EVENTS, stamps
from zchat.web import wire


def _msg(seq: int, sender: str, text: str) -> p.Msg:
    return p.Msg(room="general", seq=seq, id=f"m{seq}", ts=1.0, sender=sender, text=text, epoch="e")


def test_stamps_are_the_sender_lines_of_a_frame_and_only_those() -> None:
    lines = [common.text(0, n, t=1000.0 + n) for n in range(3)]
    evs = [
        _msg(1, "sender", lines[0]),
        p.Presence(room="general", name="web1", online=True, ts=2.0),
        _msg(2, "web7", 'quoting "text":"00|000000009|     1234.000000|" inside a line'),
        _msg(3, "sender", lines[1]),
        _msg(4, "direct3", "another 00| line, not at the start"),
        _msg(5, "sender", lines[2]),
    ]
    frames = wire.events(wire.Shared(), evs)
    assert len(frames) == 1
    data = frames[0][0]
    assert data.startswith(EVENTS)
    assert stamps(data) == [1000.0, 1001.0, 1002.0]
    # the same as decoding the frame
    items = json.loads(data)["items"]
    assert [common.stamp(i["text"]) for i in items if i["t"] == "msg" and i["text"].startswith("00|")] == stamps(data)


def test_a_frame_without_the_sender_lines_has_no_stamps() -> None:
    data = wire.events(wire.Shared(), [_msg(1, "web1", "hello")])[0][0]
    assert stamps(data) == []
