"""The wire format: round trips, decoder fuzzing, error codes, topics and names."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zchat import protocol as p
from zchat.protocol import ErrorCode as E
from zchat.protocol import ProtocolError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DECODERS = {
    "request": p.decode_request,
    "send": p.decode_send,
    "reply": p.decode_reply,
    "event": p.decode_event,
}
RESULT_TYPES = {
    "request": (p.Hello, p.Join, p.Part, p.History, p.Who, p.Rooms, p.Ping, p.Bye),
    "send": (p.Send,),
    "reply": (p.Welcome, p.Joined, p.Ok, p.HistoryReply, p.WhoReply, p.RoomsReply, p.Pong, p.Ack, p.Error),
    "event": (p.Msg, p.Presence, p.Notice),
}
KINDS = [
    "hello", "join", "part", "history", "who", "rooms", "ping", "bye", "send", "welcome", "joined",
    "ok", "hist", "members", "roomlist", "pong", "ack", "error", "msg", "presence", "notice",
]

MSG = p.Msg(room="dev", seq=7, id="b1-7", ts=1700000000.25, sender="alice", text="hi", cid="c-1", epoch="E1")

REQUESTS = [
    p.Hello(rid=1, client="zchat-test/1"),
    p.Hello(rid=2),
    p.Join(rid=3, room="dev"),
    p.Part(rid=4, room="dev"),
    p.History(rid=5, room="dev", limit=50, before=90, after=10),
    p.History(rid=6, room="@alice:bob"),
    p.Who(rid=7, room="dev"),
    p.Rooms(rid=8),
    p.Ping(rid=9),
    p.Bye(rid=10),
]
SENDS = [
    p.Send(sid="s1", cid="c1", text="hello", room="dev"),
    p.Send(sid="s1", cid="c2", text="waves", to="bob", me=True),
]
REPLIES = [
    p.Welcome(
        rid=1, name="alice", epoch="E1", boot="B1", pull_port=5556, pub_port=5557, heartbeat=10.0,
        max_bytes=65536, rate=20.0, burst=100.0, rooms={"dev": 7, "@alice:bob": 2},
    ),
    p.Joined(rid=2, room="dev", head=7, epoch="E1", members=[p.Member("alice", True), p.Member("bob", False)]),
    p.Ok(rid=3),
    p.HistoryReply(rid=4, room="dev", epoch="E1", head=7, messages=[MSG, p.Msg(room="dev", seq=8, id="x", ts=2.0, sender="bob", kind="join")]),
    p.WhoReply(rid=5, room="dev", members=[p.Member("carol", True)]),
    p.RoomsReply(rid=6, rooms=[p.RoomInfo("dev", 3, 2), p.RoomInfo("ops", 1, 0)]),
    p.Pong(rid=7, boot="B1", epoch="E1", heads={"dev": 7}),
    p.Ack(stored=[p.Stored("c1", "dev", 7, "b1-7", 1.5), p.Stored("c2", "@alice:bob", 1, "b1-8", 1.75)]),
    p.Error(code=E.RATE_LIMITED, message="slow down", rid=0, cid="c9", retry_after=0.25),
    p.Error(code=E.BAD_ROOM, message="bad room", rid=11),
]
EVENTS = [
    MSG,
    p.Msg(room="@alice:bob", seq=1, id="y", ts=3.0, sender="alice", text="psst", kind="me", to="bob", cid="c3", epoch="E1"),
    p.Presence(room="dev", name="bob", online=False, ts=4.5),
    p.Notice(event="shutdown", boot="B1", ts=5.0),
]


def expect_error(decode, data: bytes, code: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.code == code, info.value.message
    assert info.value.message
    return info.value


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("body", REQUESTS, ids=lambda b: type(b).__name__)
def test_request_round_trip(body: msgspec.Struct) -> None:
    decoded = p.decode_request(p.encode(body))
    assert decoded == body
    assert type(decoded) is type(body)
    assert decoded.v == p.PROTOCOL_VERSION


@pytest.mark.parametrize("body", SENDS, ids=["room", "dm"])
def test_send_round_trip(body: p.Send) -> None:
    assert p.decode_send(p.encode(body)) == body


@pytest.mark.parametrize("body", REPLIES, ids=lambda b: type(b).__name__)
def test_reply_round_trip(body: msgspec.Struct) -> None:
    decoded = p.decode_reply(p.encode(body))
    assert decoded == body
    assert type(decoded) is type(body)


@pytest.mark.parametrize("body", EVENTS, ids=lambda b: type(b).__name__)
def test_event_round_trip(body: msgspec.Struct) -> None:
    decoded = p.decode_event(p.encode(body))
    assert decoded == body
    assert type(decoded) is type(body)


def test_every_kind_is_covered_and_tagged() -> None:
    tags = set()
    for body in REQUESTS + SENDS + REPLIES + EVENTS:
        raw = msgspec.msgpack.decode(p.encode(body))
        assert raw["v"] == p.PROTOCOL_VERSION
        tags.add(raw["k"])
    assert tags == set(KINDS)


@pytest.mark.parametrize(
    "text",
    ["héllo wörld", "👋🏽 family: 👨\u200d👩\u200d👧", "世界 こんにちは", "مرحبا", "\u0000nul and \ttab\n", "a" * 60_000],
)
def test_unicode_text_round_trips(text: str) -> None:
    send = p.Send(sid="s", cid="c", text=text, room="dev")
    assert p.decode_send(p.encode(send)).text == text
    msg = p.Msg(room="dev", seq=1, id="i", ts=0.0, sender="alice", text=text)
    assert p.decode_event(p.encode(msg)).text == text


def test_sender_in_a_send_payload_is_ignored() -> None:
    raw = msgspec.msgpack.encode({"k": "send", "v": 1, "sid": "s", "cid": "c", "text": "t", "room": "dev", "sender": "mallory"})
    send = p.decode_send(raw)
    assert send == p.Send(sid="s", cid="c", text="t", room="dev")
    assert not hasattr(send, "sender")


def test_missing_version_defaults_to_current() -> None:
    assert p.decode_request(msgspec.msgpack.encode({"k": "ping", "rid": 3})) == p.Ping(rid=3)


# ------------------------------------------------- property: valid bodies round trip

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
floats = st.floats(allow_nan=False)
names = st.from_regex(p.NAME_RE, fullmatch=True)
rooms = st.from_regex(p.ROOM_RE, fullmatch=True)
members = st.lists(st.builds(p.Member, text, st.booleans()), max_size=4)
msgs = st.builds(
    p.Msg, room=text, seq=ints, id=text, ts=floats, sender=text, text=text,
    kind=st.sampled_from(["text", "me", "join", "part"]), to=text, cid=text, epoch=text,
)

rids = st.integers(min_value=0, max_value=p.MAX_INT)
request_bodies = st.one_of(
    st.builds(p.Hello, rid=rids, client=text),
    st.builds(p.Join, rid=rids, room=text),
    st.builds(p.Part, rid=rids, room=text),
    st.builds(
        p.History, rid=rids, room=text, limit=st.integers(1, p.MAX_HISTORY), before=rids,
        after=st.integers(min_value=-1, max_value=p.MAX_INT),
    ),
    st.builds(p.Who, rid=rids, room=text, after=text),
    st.builds(p.Rooms, rid=rids, after=text),
    st.builds(p.Ping, rid=rids),
    st.builds(p.Bye, rid=rids),
)
send_bodies = st.builds(p.Send, sid=text, cid=text, text=text, room=text, to=text, me=st.booleans())
reply_bodies = st.one_of(
    st.builds(
        p.Welcome, rid=ints, name=text, epoch=text, boot=text, pull_port=ints, pub_port=ints, heartbeat=floats,
        max_bytes=ints, rate=floats, burst=floats, rooms=st.dictionaries(text, ints, max_size=3),
    ),
    st.builds(p.Joined, rid=ints, room=text, head=ints, epoch=text, members=members),
    st.builds(p.Ok, rid=ints),
    st.builds(p.HistoryReply, rid=ints, room=text, epoch=text, head=ints, messages=st.lists(msgs, max_size=3)),
    st.builds(p.WhoReply, rid=ints, room=text, members=members),
    st.builds(p.RoomsReply, rid=ints, rooms=st.lists(st.builds(p.RoomInfo, text, ints, ints), max_size=3)),
    st.builds(p.Pong, rid=ints, boot=text, epoch=text, heads=st.dictionaries(text, ints, max_size=3)),
    st.builds(p.Ack, stored=st.lists(st.builds(p.Stored, text, text, ints, text, floats), max_size=3)),
    st.builds(p.Error, code=st.sampled_from(sorted(E.ALL)), message=text, rid=ints, cid=text, retry_after=floats),
)
event_bodies = st.one_of(
    msgs,
    st.builds(p.Presence, room=text, name=text, online=st.booleans(), ts=floats),
    st.builds(p.Notice, event=text, boot=text, ts=floats),
)


@PROP
@given(request_bodies)
def test_any_valid_request_round_trips(body: msgspec.Struct) -> None:
    assert p.decode_request(p.encode(body)) == body


@PROP
@given(send_bodies)
def test_any_valid_send_round_trips(body: p.Send) -> None:
    assert p.decode_send(p.encode(body)) == body


@PROP
@given(reply_bodies)
def test_any_valid_reply_round_trips(body: msgspec.Struct) -> None:
    assert p.decode_reply(p.encode(body)) == body


@PROP
@given(event_bodies)
def test_any_valid_event_round_trips(body: msgspec.Struct) -> None:
    assert p.decode_event(p.encode(body)) == body


# ------------------------------------------------------------ decoder fuzzing


def decode_or_protocol_error(which: str, data: bytes) -> None:
    """The contract: a body of the right kind, or ProtocolError with a known code. Nothing else."""
    try:
        body = DECODERS[which](data)
    except ProtocolError as exc:
        assert exc.code in E.ALL
        assert isinstance(exc.message, str) and exc.message
        return
    assert isinstance(body, RESULT_TYPES[which])
    assert body.v == p.PROTOCOL_VERSION


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(which: str, data: bytes) -> None:
    decode_or_protocol_error(which, data)


FIELDS = sorted(
    {"k", "v", "rid", "room", "to", "sid", "cid", "text", "me", "limit", "before", "after", "client", "name", "epoch",
     "boot", "seq", "id", "ts", "sender", "kind", "online", "event", "code", "message", "retry_after", "stored",
     "messages", "members", "rooms", "heads", "head", "pull_port", "pub_port", "heartbeat", "max_bytes", "rate", "burst"}
)
scalars = st.one_of(
    st.none(), st.booleans(), ints, st.floats(), text, st.binary(max_size=10),
    st.sampled_from(KINDS + ["text", "me", "join", "part", "dev", "alice", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS) | text, inner, max_size=3),
    max_leaves=8,
)
k_values = st.one_of(st.sampled_from(KINDS), text, ints, st.none(), st.binary(max_size=4), st.lists(scalars, max_size=2))
v_values = st.one_of(
    st.sampled_from([1, 0, 2, -1, 255, 2**64 - 1, -(2**63), 1.0, True, False, "1", b"\x01", None]), values
)


@st.composite
def plausible_maps(draw: st.DrawFn) -> bytes:
    body: dict = draw(st.dictionaries(st.sampled_from(FIELDS) | text, values, max_size=8))
    if draw(st.booleans()):
        body["k"] = draw(k_values)
    if draw(st.booleans()):
        body["v"] = draw(v_values)
    return msgspec.msgpack.encode(body)


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """A valid body with one field replaced, removed or added, or with bytes flipped or cut."""
    body = draw(st.one_of(request_bodies, send_bodies, reply_bodies, event_bodies))
    raw = msgspec.to_builtins(body)
    raw["v"] = p.PROTOCOL_VERSION
    action = draw(st.sampled_from(["replace", "remove", "add", "flip", "cut"]))
    if action == "replace":
        raw[draw(st.sampled_from(sorted(raw)))] = draw(values)
    elif action == "remove":
        del raw[draw(st.sampled_from(sorted(raw)))]
    elif action == "add":
        raw[draw(st.sampled_from(FIELDS) | text)] = draw(values)
    data = bytearray(msgspec.msgpack.encode(raw))
    if action == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif action == "cut":
        del data[draw(st.integers(0, len(data) - 1)):]
    return bytes(data)


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), plausible_maps())
def test_fuzz_plausible_maps(which: str, data: bytes) -> None:
    decode_or_protocol_error(which, data)


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), near_valid())
def test_fuzz_near_valid_bodies(which: str, data: bytes) -> None:
    decode_or_protocol_error(which, data)


@pytest.mark.parametrize("which", sorted(DECODERS))
@pytest.mark.parametrize(
    "data",
    [
        b"\x82\xa1k\xa4ping\xa1x" + b"\x91" * 5000 + b"\xc0",  # valid MessagePack nested 5000 deep
        b"\x83\xa1k\xa4ping\xa3rid\xa1x\xa1a" + b"\x91" * 5000 + b"\xc0",  # a type error first, nesting after
        b"\x81\xa1a" + b"\x81\xa1a" * 5000 + b"\xc0",  # nested maps
    ],
    ids=["arrays", "error-then-arrays", "maps"],
)
def test_deep_nesting_is_a_protocol_error_not_a_crash(which: str, data: bytes) -> None:
    expect_error(DECODERS[which], data, E.BAD_REQUEST)


# ------------------------------------------------------------ specific errors


def test_invalid_utf8_is_bad_encoding() -> None:
    good = p.encode(p.Join(rid=1, room="ab"))
    bad = good.replace(b"\xa2ab", b"\xa2\xc3\x28")
    assert bad != good
    expect_error(p.decode_request, bad, E.BAD_ENCODING)
    text = p.encode(p.Send(sid="s", cid="c", text="xyz", room="dev")).replace(b"\xa3xyz", b"\xa3\xed\xa0\x80")  # a surrogate
    expect_error(p.decode_send, text, E.BAD_ENCODING)
    event = p.encode(MSG).replace(b"\xa5alice", b"\xa5alic\xff")
    expect_error(p.decode_event, event, E.BAD_ENCODING)


@pytest.mark.parametrize("version", [0, 2, 7, -1, 2**64 - 1, "1", [1], None])
def test_unknown_version_is_bad_version(version: object) -> None:
    data = msgspec.msgpack.encode({"k": "ping", "v": version, "rid": 1})
    err = expect_error(p.decode_request, data, E.BAD_VERSION)
    assert str(p.PROTOCOL_VERSION) in err.message


def test_version_is_checked_before_kind_and_fields() -> None:
    """A future client's new kind or field is reported as a version problem."""
    expect_error(p.decode_request, msgspec.msgpack.encode({"k": "typing", "v": 2}), E.BAD_VERSION)
    expect_error(p.decode_send, msgspec.msgpack.encode({"k": "send", "v": 2, "sid": 5}), E.BAD_VERSION)


@pytest.mark.parametrize(
    ("which", "body"),
    [
        ("request", {"k": "join", "v": 1, "rid": 1, "room": 5}),
        ("request", {"k": "join", "v": 1, "rid": "1", "room": "dev"}),
        ("request", {"k": "history", "v": 1, "rid": 1, "room": "dev", "limit": 1.5}),
        ("request", {"k": "ping", "v": 1, "rid": True}),
        ("request", {"k": "ping", "v": 1.0, "rid": 1}),
        ("send", {"k": "send", "v": 1, "sid": "s", "cid": "c", "text": b"bytes", "room": "dev"}),
        ("send", {"k": "send", "v": 1, "sid": "s", "cid": "c", "text": "t", "me": "yes"}),
        ("reply", {"k": "ack", "v": 1, "stored": [{"cid": "c"}]}),
        ("event", {"k": "msg", "v": 1, "room": "dev", "seq": "7", "id": "i", "ts": 1.0, "sender": "a"}),
        ("event", {"k": "msg", "v": 1, "room": "dev", "seq": 7, "id": "i", "ts": 1.0, "sender": "a", "kind": "shout"}),
    ],
)
def test_wrong_field_type_is_bad_request(which: str, body: dict) -> None:
    expect_error(DECODERS[which], msgspec.msgpack.encode(body), E.BAD_REQUEST)


def test_missing_field_is_bad_request() -> None:
    expect_error(p.decode_request, msgspec.msgpack.encode({"k": "join", "v": 1, "rid": 1}), E.BAD_REQUEST)
    expect_error(p.decode_send, msgspec.msgpack.encode({"k": "send", "v": 1, "sid": "s", "text": "t"}), E.BAD_REQUEST)
    expect_error(p.decode_request, msgspec.msgpack.encode({"v": 1, "rid": 1}), E.BAD_REQUEST)  # no kind


@pytest.mark.parametrize("kind", ["nope", "", "PING", "send", "welcome", "msg"])
def test_unknown_kind_is_bad_request(kind: str) -> None:
    expect_error(p.decode_request, msgspec.msgpack.encode({"k": kind, "v": 1, "rid": 1}), E.BAD_REQUEST)


def test_a_body_of_another_direction_is_bad_request() -> None:
    expect_error(p.decode_request, p.encode(REPLIES[2]), E.BAD_REQUEST)  # Ok sent as a request
    expect_error(p.decode_send, p.encode(p.Ping(rid=1)), E.BAD_REQUEST)
    expect_error(p.decode_reply, p.encode(MSG), E.BAD_REQUEST)
    expect_error(p.decode_event, p.encode(p.Ping(rid=1)), E.BAD_REQUEST)


@pytest.mark.parametrize("data", [b"\x01", b"\x91\x01", b"\xa3abc", b"\xc0", b"\xc3"])
def test_valid_msgpack_that_is_not_a_map_is_bad_request(data: bytes) -> None:
    for decode in DECODERS.values():
        expect_error(decode, data, E.BAD_REQUEST)


@pytest.mark.parametrize("data", [b"\xc1", b"\xff" * 10, b"not msgpack at all", b"\x81\xa1k"])
def test_not_msgpack_is_bad_encoding(data: bytes) -> None:
    for decode in DECODERS.values():
        expect_error(decode, data, E.BAD_ENCODING)


def test_empty_bytes_is_bad_encoding() -> None:
    for decode in DECODERS.values():
        expect_error(decode, b"", E.BAD_ENCODING)


@pytest.mark.parametrize(
    ("which", "body"),
    [("request", REQUESTS[4]), ("send", SENDS[0]), ("reply", REPLIES[0]), ("event", MSG)],
    ids=["request", "send", "reply", "event"],
)
def test_every_truncation_is_bad_encoding(which: str, body: msgspec.Struct) -> None:
    data = p.encode(body)
    for cut in range(len(data)):
        expect_error(DECODERS[which], data[:cut], E.BAD_ENCODING)
    assert DECODERS[which](data) == body


def test_trailing_garbage_is_bad_encoding() -> None:
    expect_error(p.decode_request, p.encode(p.Ping(rid=1)) + b"\x00", E.BAD_ENCODING)


def test_oversize_is_too_large() -> None:
    body = p.encode(p.Send(sid="s", cid="c", text="x" * p.MAX_MESSAGE_BYTES, room="dev"))
    assert len(body) > p.MAX_MESSAGE_BYTES
    err = expect_error(p.decode_send, body, E.TOO_LARGE)
    assert str(len(body)) in err.message
    expect_error(p.decode_request, p.encode(p.Hello(rid=1, client="c" * p.MAX_MESSAGE_BYTES)), E.TOO_LARGE)


def test_size_limit_is_inclusive_and_configurable() -> None:
    data = p.encode(p.Join(rid=1, room="dev"))
    assert p.decode_request(data, limit=len(data)) == p.Join(rid=1, room="dev")
    expect_error(lambda d: p.decode_request(d, limit=len(d) - 1), data, E.TOO_LARGE)
    send = p.encode(SENDS[0])
    assert p.decode_send(send, limit=len(send)) == SENDS[0]
    expect_error(lambda d: p.decode_send(d, limit=10), send, E.TOO_LARGE)
    # the size check comes before decoding: garbage over the limit is too_large, not bad_encoding
    expect_error(lambda d: p.decode_request(d, limit=4), b"\xc1" * 5, E.TOO_LARGE)


def test_replies_and_events_have_no_size_limit() -> None:
    page = p.HistoryReply(rid=1, room="dev", epoch="E1", head=3, messages=[
        p.Msg(room="dev", seq=i, id=str(i), ts=0.0, sender="a", text="y" * 60_000) for i in range(1, 4)
    ])
    data = p.encode(page)
    assert len(data) > p.MAX_MESSAGE_BYTES
    assert p.decode_reply(data) == page
    big = p.Msg(room="dev", seq=1, id="i", ts=0.0, sender="a", text="z" * 100_000)
    assert p.decode_event(p.encode(big)) == big


def test_error_codes_are_distinct_strings() -> None:
    codes = [v for k, v in vars(E).items() if k.isupper() and k != "ALL"]
    assert len(codes) == len(set(codes)) == len(E.ALL) == 19
    assert set(codes) == E.ALL


# ------------------------------------------------------------------- topics


def test_topic_bytes() -> None:
    assert p.room_topic("dev") == b"#dev\x00"
    assert p.inbox_topic("alice") == b"@alice\x00"
    assert p.SYSTEM_TOPIC == b"$\x00"


def test_room_topic_is_not_a_prefix_of_a_longer_room() -> None:
    assert not p.room_topic("devops").startswith(p.room_topic("dev"))
    assert not p.inbox_topic("alice2").startswith(p.inbox_topic("alice"))
    assert b"#devops".startswith(b"#dev")  # what the NUL guards against


@PROP
@given(rooms, rooms)
def test_no_room_topic_is_a_prefix_of_another(a: str, b: str) -> None:
    if a != b:
        assert not p.room_topic(b).startswith(p.room_topic(a))
    assert not p.room_topic(b).startswith(p.inbox_topic(a))
    assert p.parse_topic(p.room_topic(a)) == ("room", a)


@PROP
@given(names)
def test_inbox_topics_parse(name: str) -> None:
    assert p.parse_topic(p.inbox_topic(name)) == ("inbox", name)


def test_parse_topic_accepts_exact_topics() -> None:
    assert p.parse_topic(b"#dev\x00") == ("room", "dev")
    assert p.parse_topic(b"#dev.ops_2-x\x00") == ("room", "dev.ops_2-x")
    assert p.parse_topic(b"@alice\x00") == ("inbox", "alice")
    assert p.parse_topic(p.SYSTEM_TOPIC) == ("system", "")
    assert p.parse_topic(b"#" + b"r" * p.MAX_ROOM_LEN + b"\x00") == ("room", "r" * p.MAX_ROOM_LEN)
    assert p.parse_topic(b"@" + b"n" * p.MAX_NAME_LEN + b"\x00") == ("inbox", "n" * p.MAX_NAME_LEN)


@pytest.mark.parametrize(
    "topic",
    [
        b"", b"#", b"@", b"$", b"#\x00", b"@\x00", b"#de", b"#dev", b"@alice", b"#de\x00x", b"\x00",
        b"#DEV\x00", b"@Alice\x00", b"#d\xc3\xa9v\x00", b"@\xff\x00", b"#dev\x00\x00", b"#dev\n\x00",
        b"#dev ops\x00", b"%dev\x00", b"@dev.ops\x00", b"#@alice:bob\x00", b"$x\x00", b"$\x00\x00",
        b"#" + b"r" * (p.MAX_ROOM_LEN + 1) + b"\x00", b"@" + b"n" * (p.MAX_NAME_LEN + 1) + b"\x00",
    ],
)
def test_parse_topic_rejects(topic: bytes) -> None:
    assert p.parse_topic(topic) is None


@PROP
@given(st.binary(max_size=80))
def test_parse_topic_never_raises(topic: bytes) -> None:
    parsed = p.parse_topic(topic)
    if parsed is not None:
        kind, name = parsed
        assert {"room": p.room_topic, "inbox": p.inbox_topic, "system": lambda _: p.SYSTEM_TOPIC}[kind](name) == topic


# ----------------------------------------------------------------- DM rooms


def test_dm_room_is_symmetric_and_sorted() -> None:
    assert p.dm_room("bob", "alice") == p.dm_room("alice", "bob") == "@alice:bob"
    assert p.dm_room("alice", "alice") == "@alice:alice"
    assert p.is_dm_room("@alice:bob")
    assert not p.is_dm_room("dev")


@PROP
@given(names, names)
def test_dm_room_properties(a: str, b: str) -> None:
    room = p.dm_room(a, b)
    assert room == p.dm_room(b, a)
    assert p.dm_peers(room) == tuple(sorted((a, b)))
    assert p.is_dm_room(room)
    assert not p.valid_room(room)  # a DM can never be joined as a public room


@pytest.mark.parametrize(
    "room", ["dev", "@alice", "@alice:", "@:bob", "@Alice:bob", "@alice:bob:carol", "@al ice:bob", "alice:bob", "@", ""]
)
def test_dm_peers_rejects(room: str) -> None:
    assert p.dm_peers(room) is None


def test_dm_peers() -> None:
    assert p.dm_peers("@alice:bob") == ("alice", "bob")


# -------------------------------------------------------------- names, rooms


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a", True), ("0", True), ("alice", True), ("a-b_c9", True), ("a" * p.MAX_NAME_LEN, True),
        ("", False), ("a" * (p.MAX_NAME_LEN + 1), False), ("Alice", False), ("ALICE", False), ("-a", False),
        ("_a", False), ("a.b", False), ("a b", False), ("é", False), ("alice\n", False), ("al:ice", False),
        ("@alice", False), ("ａ", False),
    ],
)
def test_valid_name(name: str, ok: bool) -> None:
    assert p.valid_name(name) is ok


@pytest.mark.parametrize(
    ("room", "ok"),
    [
        ("dev", True), ("0", True), ("dev.ops", True), ("dev-ops_2", True), ("r" * p.MAX_ROOM_LEN, True),
        ("", False), ("r" * (p.MAX_ROOM_LEN + 1), False), ("Dev", False), (".dev", False), ("-dev", False),
        ("@alice:bob", False), ("dev ops", False), ("dév", False), ("dev\n", False), ("#dev", False),
        ("dev\x00", False),
    ],
)
def test_valid_room(room: str, ok: bool) -> None:
    assert p.valid_room(room) is ok


def test_batch_of_messages_round_trips() -> None:
    items = [p.Msg(room="dev", seq=i, id=f"x{i}", ts=1.5, sender="alice", text=f"m{i}", epoch="E") for i in (1, 2, 3)]
    decoded = p.decode_event(p.encode(p.Batch(items=items)))
    assert isinstance(decoded, p.Batch) and decoded.items == items


@pytest.mark.parametrize(
    "fields",
    [
        {"after": 2**63}, {"before": 2**63}, {"after": -2}, {"before": -1}, {"limit": 0},
        {"limit": p.MAX_HISTORY + 1}, {"after": 2**64 - 1},
    ],
)
def test_history_integers_are_checked_at_the_edge(fields: dict) -> None:
    """An after/before beyond int64 overflowed SQLite and poisoned a whole turn's replies."""
    body = _raw({"k": "history", "v": 1, "rid": 7, "room": "general", **fields})
    with pytest.raises(p.ProtocolError) as info:
        p.decode_request(body)
    assert info.value.code == E.BAD_REQUEST
    assert info.value.rid == 7  # the error still finds its request
    assert next(iter(fields)) in info.value.message


def test_rids_outside_int64_are_refused() -> None:
    for rid in (-1, 2**63, 2**64 - 1):
        with pytest.raises(p.ProtocolError) as info:
            p.decode_request(_raw({"k": "ping", "v": 1, "rid": rid}))
        assert info.value.code == E.BAD_REQUEST


def test_sends_frames_are_capped_in_items() -> None:
    """65,516 empty items in one frame blocked the broker's loop 1.66 s."""
    item = p.Send(sid="s", cid="c", text="x", room="general")
    assert len(p.decode_sends(p.encode(p.Sends(items=[item] * p.MAX_SENDS_ITEMS)))[0]) == p.MAX_SENDS_ITEMS
    with pytest.raises(p.ProtocolError) as info:
        p.decode_sends(p.encode(p.Sends(items=[item] * (p.MAX_SENDS_ITEMS + 1))))
    assert info.value.code == E.BAD_REQUEST


def _raw(fields: dict) -> bytes:
    return msgspec.msgpack.encode(fields)


def test_an_oversized_sends_frame_is_refused_before_its_items_are_decoded() -> None:
    """65,516 empty items: decoding them all only to find the array too long cost ~20 ms a
    frame (1,927 such frames kept the broker at 92% CPU). The count is read from the array
    header first; the message says so (the full decoder's would say 'Expected array')."""
    body = _raw({"k": "sends", "v": 1, "items": [{}] * 65_000})
    for decode in (p.decode_router, p.decode_sends):
        with pytest.raises(p.ProtocolError) as info:
            decode(body)
        assert info.value.code == E.BAD_REQUEST
        assert f"at most {p.MAX_SENDS_ITEMS} items" in info.value.message
    assert p._array_length(memoryview(msgspec.msgpack.encode([1] * 5))) == 5
    assert p._array_length(memoryview(msgspec.msgpack.encode([1] * 300))) == 300
    assert p._array_length(memoryview(msgspec.msgpack.encode([1] * 70_000))) == 70_000
    assert p._array_length(memoryview(msgspec.msgpack.encode({"a": 1}))) == -1
