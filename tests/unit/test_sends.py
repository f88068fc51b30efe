"""The ``sends`` frame: several chat lines in one PUSH frame, each checked like a Send."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zchat import protocol as p
from zchat.protocol import ErrorCode as E
from zchat.protocol import ProtocolError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def send(cid: str, text: str = "hi", **kw: object) -> p.Send:
    return p.Send(sid="s1", cid=cid, text=text, room=kw.pop("room", "dev"), **kw)  # type: ignore[arg-type]


def pack(*items: bytes) -> bytes:
    """How the client library packs encoded Sends: as raw items of one Sends body."""
    return p.encode(p.Sends(items=[msgspec.Raw(i) for i in items]))  # type: ignore[misc]


def test_a_plain_send_is_one_line() -> None:
    assert p.decode_sends(p.encode(send("c1"))) == ([send("c1")], [])


def test_sends_decode_in_order() -> None:
    lines = [send(f"c{i}", f"line {i}") for i in range(50)]
    good, bad = p.decode_sends(pack(*(p.encode(s) for s in lines)))
    assert good == lines
    assert bad == []


def test_packed_raw_items_equal_a_typed_sends() -> None:
    lines = [send("a"), send("b", to="bob", room="", me=True)]
    assert pack(*(p.encode(s) for s in lines)) == p.encode(p.Sends(items=lines))


def test_bad_items_get_their_own_errors_and_the_good_ones_are_kept() -> None:
    wrong_type = msgspec.msgpack.encode({"k": "send", "v": 1, "sid": "s1", "cid": "c2", "text": 5})
    wrong_version = msgspec.msgpack.encode({"k": "send", "v": 9, "sid": "s1", "cid": "c3", "text": "x"})
    bad_utf8 = msgspec.msgpack.encode({"k": "send", "v": 1, "sid": "s1", "cid": "c4", "text": "x"}).replace(b"\xa1x", b"\xa1\xff")
    not_a_send = p.encode(p.Ping(rid=1))
    good, bad = p.decode_sends(pack(p.encode(send("c1")), wrong_type, wrong_version, bad_utf8, not_a_send, p.encode(send("c6"))))
    assert [s.cid for s in good] == ["c1", "c6"]
    assert [(e.code, e.sid, e.cid) for e in bad] == [
        (E.BAD_REQUEST, "s1", "c2"),
        (E.BAD_VERSION, "s1", "c3"),
        (E.BAD_ENCODING, "", ""),  # nothing readable is salvaged from invalid UTF-8
        (E.BAD_REQUEST, "", ""),
    ]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (msgspec.msgpack.encode({"k": "sends", "v": 1, "items": 5}), E.BAD_REQUEST),
        (msgspec.msgpack.encode({"k": "sends", "v": 2, "items": []}), E.BAD_VERSION),
        (msgspec.msgpack.encode({"k": "sends", "items": "x"}), E.BAD_REQUEST),
        (p.encode(p.Hello(rid=1)), E.BAD_REQUEST),
        (b"\x92\xc1", E.BAD_ENCODING),
        (b"", E.BAD_ENCODING),
    ],
)
def test_a_bad_frame_is_one_protocol_error(data: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        p.decode_sends(data)
    assert info.value.code == code


def test_the_limit_holds_for_the_whole_frame() -> None:
    data = pack(*(p.encode(send(f"c{i}", "x" * 1000)) for i in range(70)))
    assert len(data) > p.MAX_MESSAGE_BYTES
    with pytest.raises(ProtocolError) as info:
        p.decode_sends(data)
    assert info.value.code == E.TOO_LARGE
    assert len(p.decode_sends(data, limit=len(data))[0]) == 70


def test_decode_send_still_takes_exactly_one_line() -> None:
    with pytest.raises(ProtocolError) as info:
        p.decode_send(pack(p.encode(send("c1")), p.encode(send("c2"))))
    assert info.value.code == E.BAD_REQUEST


def contract(data: bytes) -> None:
    """Lines and per-line errors, or one ProtocolError with a known code. Nothing else."""
    try:
        good, bad = p.decode_sends(data)
    except ProtocolError as exc:
        assert exc.code in E.ALL and exc.message
        return
    assert all(type(s) is p.Send and s.v == p.PROTOCOL_VERSION for s in good)
    assert all(isinstance(e, ProtocolError) and e.code in E.ALL for e in bad)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    contract(data)


item_values = st.one_of(
    st.builds(lambda c, t: p.encode(send(c, t)), st.text(max_size=8), st.text(max_size=8)),
    st.dictionaries(st.sampled_from(["k", "v", "sid", "cid", "text", "room", "to", "me"]),
                    st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=5), st.booleans(), st.sampled_from(["send", "sends"])),
                    max_size=6).map(msgspec.msgpack.encode),
    st.binary(max_size=12),
)


@FUZZ
@given(st.lists(item_values, max_size=6), st.sampled_from([1, 2, None]))
def test_fuzz_sends_of_arbitrary_items(items: list[bytes], version: int | None) -> None:
    body = {"k": "sends", "items": [msgspec.Raw(i) for i in items]}
    if version is not None:
        body["v"] = version
    contract(msgspec.msgpack.encode(body))
