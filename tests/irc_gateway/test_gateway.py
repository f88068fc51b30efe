"""The gateway over a plain socket, on a real broker: registration, JOIN with history,
PRIVMSG both ways, DMs, NAMES/WHO/LIST/TOPIC, QUIT, presence and the bad-input numerics."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.conftest import chat, collect, wait_for
from tests.irc_gateway.conftest import open_peer
from zchat import protocol as p
from zchat.irc.lines import MAX_LINE


async def test_cap_ls_302_waits_for_cap_end(irc, gateway) -> None:  # type: ignore[no-untyped-def]
    peer = await irc()
    peer.send("CAP LS 302", "NICK alice", "USER alice 0 * :Alice")
    ls = await peer.cmd("CAP")
    assert ls.params[1] == "LS" and "sasl=PLAIN" in ls.params[2] and "server-time" in ls.params[2]
    early = await peer.marker("before-end")
    assert not [x for x in early if x.command == "001"]  # nothing registers during CAP
    peer.send("CAP END")
    welcome = await peer.cmd("001")
    assert welcome.params[0] == "alice"
    isupport = await peer.cmd("005")
    assert "CASEMAPPING=ascii" in isupport.params and "UTF8ONLY" in isupport.params


async def test_join_plays_history_with_server_time_in_a_batch(irc, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await bob.join("general")
    for i in range(3):
        await bob.send("general", f"line {i}")
    peer = await irc("alice", caps="server-time batch message-tags")
    peer.send("JOIN #general")
    join = await peer.cmd("JOIN")
    assert join.source.startswith("alice!") and join.params == ("#general",)
    names = await peer.cmd("353")
    assert set(names.params[-1].split()) == {"alice", "bob"}
    await peer.cmd("366")
    start = await peer.cmd("BATCH")
    assert start.params[0].startswith("+") and start.params[1:] == ("chathistory", "#general")
    tag = start.params[0][1:]
    for i in range(3):
        msg = await peer.cmd("PRIVMSG")
        assert msg.source.startswith("bob!") and msg.params == ("#general", f"line {i}")
        assert msg.tag("batch") == tag and msg.tag("time", ).endswith("Z") and msg.tag("msgid")
    end = await peer.cmd("BATCH")
    assert end.params == ("-" + tag,)


async def test_history_without_caps_is_plain_lines(irc, connect, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from zchat.irc import gateway as gw_module

    monkeypatch.setattr(gw_module, "DATED_AFTER", 0.0)  # the line counts as old at once
    bob = await connect("bob")
    await bob.join("general")
    await bob.send("general", "old line")
    peer = await irc("alice")
    peer.send("JOIN #general")
    msg = await peer.cmd("PRIVMSG")
    # no server-time: the line from the past says when it was said
    assert msg.params[0] == "#general" and re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d\] old line", msg.params[1]), msg
    assert msg.tags == () and b"BATCH" not in b"".join(peer.raw)
    await bob.send("general", "live line")
    live = await peer.cmd("PRIVMSG")
    assert live.params == ("#general", "live line")  # live lines are not dated


async def test_privmsg_both_ways_and_actions(irc, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await bob.join("general")
    peer = await irc("alice")
    peer.send("JOIN #general")
    await peer.cmd("366")
    peer.send("PRIVMSG #general :hello from irc", "PRIVMSG #general :\x01ACTION waves\x01")
    got = await chat(bob, 2)
    assert [(m.sender, m.text, m.kind) for m in got] == [("alice", "hello from irc", "text"), ("alice", "waves", "me")]
    await bob.send("general", "hello from zchat")
    await bob.send("general", "nods", me=True)
    one = await peer.expect(lambda x: x.command == "PRIVMSG" and x.source.startswith("bob!"))
    two = await peer.expect(lambda x: x.command == "PRIVMSG" and x.source.startswith("bob!"))
    assert one.params == ("#general", "hello from zchat") and two.params == ("#general", "\x01ACTION nods\x01")
    # without echo-message our own lines are not sent back
    assert not [x for x in peer.lines if x.command == "PRIVMSG" and x.source.startswith("alice!")]


async def test_echo_message_sends_own_lines_back(irc, connect) -> None:  # type: ignore[no-untyped-def]
    peer = await irc("alice", caps="echo-message")
    peer.send("JOIN #general")
    await peer.cmd("366")
    peer.send("PRIVMSG #general :echo me")
    echo = await peer.cmd("PRIVMSG")
    assert echo.source.startswith("alice!") and echo.params == ("#general", "echo me")


async def test_dms_both_ways(irc, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    peer = await irc("alice")
    peer.send("PRIVMSG bob :psst bob")
    got = await chat(bob, 1)
    assert (got[0].sender, got[0].to, got[0].text) == ("alice", "bob", "psst bob")
    await bob.send_dm("alice", "hi alice")
    msg = await peer.cmd("PRIVMSG")
    assert msg.source.startswith("bob!") and msg.params == ("alice", "hi alice")


async def test_names_who_list_topic(irc, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await bob.join("general")
    await bob.join("dev")
    peer = await irc("alice")
    peer.send("JOIN #general")
    await peer.cmd("366")
    peer.send("NAMES #general")
    names = await peer.cmd("353")
    assert set(names.params[-1].split()) == {"alice", "bob"}
    peer.send("WHO #general")
    who = [await peer.cmd("352"), await peer.cmd("352")]
    assert sorted(w.params[5] for w in who) == ["alice", "bob"] and {w.params[6] for w in who} == {"H"}
    await peer.cmd("315")
    peer.send("LIST")
    await peer.cmd("321")
    rows = [await peer.cmd("322"), await peer.cmd("322")]
    assert {(r.params[1], r.params[2]) for r in rows} == {("#dev", "1"), ("#general", "2")}
    await peer.cmd("323")
    peer.send("TOPIC #general")
    assert (await peer.cmd("331")).params[1] == "#general"


async def test_quit_closes_and_the_others_see_presence(irc, connect, broker) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await bob.join("general")
    peer = await irc("alice")
    peer.send("JOIN #general")
    await peer.cmd("366")
    peer.send("QUIT :see you")
    err = await peer.cmd("ERROR")
    assert "see you" in err.params[0]
    await wait_for(lambda: peer.closed, what="the gateway to close the connection")
    offline = await collect(bob, 1, kinds=(p.Presence,), where=lambda e: e.name == "alice")
    assert offline[0].online is False


async def test_presence_becomes_join_and_quit(irc, connect, broker) -> None:  # type: ignore[no-untyped-def]
    from zchat.client import Client

    bob = await connect("bob")
    await bob.join("general")
    peer = await irc("alice")
    peer.send("JOIN #general")
    await peer.cmd("366")
    await bob.close()
    quit_ = await peer.cmd("QUIT")
    assert quit_.source.startswith("bob!")
    again = Client(broker.endpoint, "bob", "secret-of-bob-0123456789")
    await again.connect()
    try:
        join = await peer.expect(lambda x: x.command == "JOIN" and x.source.startswith("bob!"))
        assert join.params == ("#general",)
    finally:
        await again.close()


async def test_reconnect_shows_nothing_twice(irc, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await bob.join("general")
    await bob.send("general", "before")
    first = await irc("alice")
    first.send("JOIN #general")
    await first.expect(lambda x: x.command == "PRIVMSG" and x.params[-1].endswith("before"))
    first.send("QUIT")
    await wait_for(lambda: first.closed, what="the first connection to close")
    await bob.send("general", "while away")
    second = await irc("alice")  # a member already: the gateway joins #general for it
    await second.expect(lambda x: x.command == "PRIVMSG" and x.params[-1].endswith("while away"))
    lines = await second.marker()
    texts = [x.params[-1].split("] ", 1)[-1] for x in second.lines if x.command == "PRIVMSG"]
    assert texts == ["while away"], (texts, lines)


async def test_long_zchat_lines_are_split_within_512_bytes(irc, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await bob.join("general")
    peer = await irc("alice", caps="server-time")
    peer.send("JOIN #general")
    await peer.cmd("366")
    text = " ".join(f"wörd{i}" for i in range(400)) + "\nsecond line"
    await bob.send("general", text)
    await bob.send("general", "END")
    await peer.expect(lambda x: x.command == "PRIVMSG" and x.params[-1] == "END")
    bodies = [raw for raw in peer.raw if b" PRIVMSG " in raw]
    assert len(bodies) > 4
    for raw in bodies:
        body = raw.split(b" ", 1)[1] if raw.startswith(b"@") else raw
        assert len(body) <= MAX_LINE, len(body)
    pieces = [x.params[-1] for x in peer.lines if x.command == "PRIVMSG"][:-1]
    assert " ".join(pieces[:-1]) == text.split("\n")[0] and pieces[-1] == "second line"


async def test_bad_input_gets_numerics_and_changes_nothing(irc, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await bob.join("general")
    peer = await irc()
    peer.send("NICK -bad", "NICK [x]")
    assert (await peer.cmd("432")).params[1] == "-bad"
    assert (await peer.cmd("432")).params[1] == "[x]"
    peer.send("JOIN #general")
    await peer.cmd("451")
    peer.send("NICK alice", "USER alice 0 * :a")
    await peer.cmd("001")
    peer.send(b"PRIVMSG #general :" + b"x" * 600 + b"\r\n")
    assert (await peer.cmd("417")).params[0] == "alice"
    peer.send("JOIN #general")
    await peer.cmd("366")
    peer.send(b"PRIVMSG #general :caf\xe9 latin-1\r\n")
    fail = await peer.cmd("FAIL")
    assert fail.params[:2] == ("PRIVMSG", "INVALID_UTF8")
    peer.send("JOIN #bad!name,&local", "PRIVMSG #not-joined :x")
    assert (await peer.cmd("479")).params[1] == "#bad!name"
    assert (await peer.cmd("403")).params[1] == "&local"
    assert (await peer.cmd("404")).params[1] == "#not-joined"
    peer.send("PRIVMSG #general :still fine")
    got = await chat(bob, 1)
    assert got[0].text == "still fine"  # nothing else reached zchat


async def test_nick_change_after_registration_is_refused(irc) -> None:  # type: ignore[no-untyped-def]
    peer = await irc("alice")
    peer.send("NICK bob")
    assert (await peer.cmd("447")).params[1] == "bob"


async def test_ping_pong(irc) -> None:  # type: ignore[no-untyped-def]
    peer = await irc("alice")
    peer.send("PING :some token")
    pong = await peer.cmd("PONG")
    assert pong.params[-1] == "some token"


@pytest.mark.parametrize("burst", [3])
async def test_flood_gets_a_notice_not_a_disconnect(tmp_path, burst) -> None:  # type: ignore[no-untyped-def]
    import time

    from tests.conftest import RunningBroker
    from tests.irc_gateway.conftest import register
    from zchat.client import Client
    from zchat.core import Limits
    from zchat.irc import gateway as gw_module
    from zchat.irc.server import Gateway
    from zchat.irc.signin import Gatekeeper

    broker = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=0.5, rate=0.5, burst=burst)).start()
    gw = Gateway(broker.endpoint, Gatekeeper(None))
    port = await gw.start("127.0.0.1", 0)
    carol = Client(broker.endpoint, "carol", "secret-of-carol-0123456789")
    await carol.connect()
    await carol.join("general")
    heard: list[str] = []
    carol.listen(lambda events: heard.extend(e.text for e in events if isinstance(e, p.Msg) and e.sender == "alice" and e.kind == "text"))
    try:
        peer = await open_peer(port)
        await register(peer, "alice")
        peer.send("JOIN #general")
        await peer.cmd("366")
        start = time.monotonic()
        peer.send(*(f"PRIVMSG #general :flood {i}" for i in range(40)))

        def refused() -> int:  # the lines the NOTICEs say were not sent
            notes = [x.params[-1] for x in peer.lines if x.command == "NOTICE" and "too fast" in x.params[-1]]
            return sum(int(re.search(r"(\d+) line", text).group(1)) for text in notes)  # type: ignore[union-attr]

        # every line is either stored (carol hears it) or counted in a NOTICE, exactly once
        await wait_for(lambda: refused() + len(heard) == 40, 60, "every line stored or told as refused")
        took = time.monotonic() - start
        assert burst <= len(heard) < 40
        await peer.marker()
        assert not peer.closed
        notices = [x for x in peer.lines if x.command == "NOTICE" and "too fast" in x.params[-1]]
        assert notices[0].params[0] == "#general"
        assert len(notices) <= took / gw_module.NOTICE_EVERY + 2  # at most one a second, not one a line
        assert refused() + len(heard) == 40
        await peer.close()
    finally:
        await carol.close()
        await gw.stop()
        await broker.stop()


@pytest.fixture
def certificate(tmp_path):  # type: ignore[no-untyped-def]
    """A self-signed certificate for 127.0.0.1 (openssl)."""
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (to make a test certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


async def test_tls(broker, certificate) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import ssl

    from tests.irc_gateway.conftest import Peer, register
    from zchat.irc.server import Gateway, tls_context
    from zchat.irc.signin import Gatekeeper

    cert, key = certificate
    gw = Gateway(broker.endpoint, Gatekeeper(None))
    port = await gw.start("127.0.0.1", 0, tls_context(str(cert), str(key)))
    try:
        client_ctx = ssl.create_default_context(cafile=str(cert))
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        peer = Peer(reader, writer)
        await register(peer, "alice")
        assert writer.get_extra_info("ssl_object").version().startswith("TLS")
        plain = await open_peer(port)  # a plain-text client gets nothing useful from a TLS port
        plain.send("NICK bob", "USER bob 0 * :b")
        await wait_for(lambda: plain.closed, what="the TLS port to drop a plain-text client")
        assert not [x for x in plain.lines if x.command == "001"]
        await peer.close()
    finally:
        await gw.stop()


async def test_chathistory_latest_before_after(irc, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await bob.join("general")
    for i in range(6):
        await bob.send("general", f"h{i}")
    peer = await irc("alice", caps="server-time batch message-tags draft/chathistory")
    peer.send("CHATHISTORY LATEST #general * 3")

    async def batch() -> list:
        start = await peer.cmd("BATCH")
        assert start.params[1:] == ("chathistory", "#general"), start
        lines = []
        while True:
            line = await peer.expect(lambda x: x.command in ("PRIVMSG", "BATCH"))
            if line.command == "BATCH":
                assert line.params == ("-" + start.params[0][1:],)
                return lines
            assert line.tag("batch") == start.params[0][1:]
            lines.append(line)

    latest = await batch()
    assert [x.params[1] for x in latest] == ["h3", "h4", "h5"]
    first = latest[0].tag("msgid")
    peer.send(f"CHATHISTORY BEFORE #general msgid={first} 2")
    assert [x.params[1] for x in await batch()] == ["h1", "h2"]
    peer.send(f"CHATHISTORY AFTER #general msgid={first} 10")
    assert [x.params[1] for x in await batch()] == ["h4", "h5"]
    peer.send("CHATHISTORY BEFORE #general timestamp=2026-01-01T00:00:00.000Z 2", "CHATHISTORY AROUND #general * 2")
    assert (await peer.cmd("FAIL")).params[:2] == ("CHATHISTORY", "INVALID_MSGREFTYPE")
    assert (await peer.cmd("FAIL")).params[:2] == ("CHATHISTORY", "INVALID_PARAMS")


async def test_chathistory_of_a_dm(irc, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    peer = await irc("alice", caps="batch draft/chathistory")
    await bob.send_dm("alice", "dm one")
    await peer.expect(lambda x: x.command == "PRIVMSG" and x.params[-1].endswith("dm one"))
    peer.send("PRIVMSG bob :dm two")
    await chat(bob, 1)
    peer.send("CHATHISTORY LATEST bob * 10")
    start = await peer.cmd("BATCH")
    assert start.params[1:] == ("chathistory", "bob")
    one = await peer.cmd("PRIVMSG")
    two = await peer.cmd("PRIVMSG")
    assert one.source.startswith("bob!") and one.params[0] == "alice" and one.params[1].endswith("dm one")
    assert two.source.startswith("alice!") and two.params[0] == "bob" and two.params[1].endswith("dm two")


async def test_a_broker_restart_is_told_and_survived(irc, connect, broker) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await bob.join("general")
    peer = await irc("alice")
    peer.send("JOIN #general")
    await peer.cmd("366")
    await broker.stop()
    await peer.expect(lambda x: x.command == "NOTICE" and "lost the zchat broker" in x.params[-1], timeout=20)
    await broker.start()
    await peer.expect(lambda x: x.command == "NOTICE" and "connected to the zchat broker again" in x.params[-1], timeout=30)
    await bob.send("general", "after the restart", timeout=20)
    got = await peer.expect(lambda x: x.command == "PRIVMSG" and x.params[-1].endswith("after the restart"), timeout=20)
    assert got.source.startswith("bob!")
    peer.send("PRIVMSG #general :irc after the restart")
    back = await collect(bob, 1, timeout=20, where=lambda m: m.sender == "alice" and m.kind == "text")
    assert back[0].text == "irc after the restart"


async def test_a_burst_from_irc_arrives_whole_in_order_and_is_not_echoed(irc, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await bob.join("general")
    peer = await irc("alice")
    peer.send("JOIN #general")
    await peer.cmd("366")
    peer.send(*(f"PRIVMSG #general :burst {i}" for i in range(300)))  # more than MAX_UNACKED at once
    got = await collect(bob, 300, timeout=60, where=lambda m: m.sender == "alice" and m.kind == "text")
    assert [m.text for m in got] == [f"burst {i}" for i in range(300)]
    await peer.marker()
    assert not [x for x in peer.lines if x.command == "PRIVMSG"]  # no echo without echo-message


async def test_list_is_bounded(irc, connect, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from zchat.irc import gateway as gw_module

    monkeypatch.setattr(gw_module, "MAX_LIST", 2)
    bob = await connect("bob")
    for room in ("a1", "a2", "a3"):
        await bob.join(room)
    peer = await irc("alice")
    peer.send("LIST")
    await peer.cmd("321")
    rows = [await peer.cmd("322"), await peer.cmd("322")]
    assert [r.params[1] for r in rows] == ["#a1", "#a2"]
    note = await peer.cmd("NOTICE")
    assert "first 2 of 3" in note.params[-1]
    await peer.cmd("323")


async def test_refusals_from_the_broker_become_numerics(irc) -> None:  # type: ignore[no-untyped-def]
    peer = await irc("alice")
    peer.send("PRIVMSG nobody-here :hello?")
    err = await peer.cmd("401")
    assert err.params[1] == "nobody-here"
    peer.send("PART #general")
    assert (await peer.cmd("442")).params[1] == "#general"


async def test_dms_during_cap_negotiation_wait_for_registration(irc, connect) -> None:  # type: ignore[no-untyped-def]
    """Signed in by SASL, still in CAP: a DM is held (bounded) and shown after 001."""
    import base64

    bob = await connect("bob")
    peer = await irc()
    peer.send("CAP LS 302", "NICK alice", "USER alice 0 * :a", "CAP REQ :sasl", "AUTHENTICATE PLAIN")
    await peer.expect(lambda x: x.command == "AUTHENTICATE")
    peer.send("AUTHENTICATE " + base64.b64encode(b"\0alice\0whatever").decode())
    await peer.cmd("903")
    await bob.send_dm("alice", "while you negotiate")
    early = await peer.marker()
    assert not [x for x in early if x.command == "PRIVMSG"]
    peer.send("CAP END")
    await peer.cmd("001")
    dm = await peer.expect(lambda x: x.command == "PRIVMSG" and x.params[-1] == "while you negotiate")
    assert dm.source.startswith("bob!")


async def test_what_waits_for_registration_is_bounded_in_bytes(irc, connect, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import base64

    from zchat.irc import gateway as gw_module

    monkeypatch.setattr(gw_module, "MAX_EARLY_BYTES", 1000)
    bob = await connect("bob")
    peer = await irc()
    peer.send("CAP LS 302", "NICK alice", "USER alice 0 * :a", "CAP REQ :sasl", "AUTHENTICATE PLAIN")
    await peer.expect(lambda x: x.command == "AUTHENTICATE")
    peer.send("AUTHENTICATE " + base64.b64encode(b"\0alice\0whatever").decode())
    await peer.cmd("903")
    for i in range(5):
        await bob.send_dm("alice", f"{i} " + "z" * 400)
    err = await peer.cmd("ERROR")
    assert "before registration" in err.params[0]
    await wait_for(lambda: peer.closed, what="the connection to close")


async def test_moderation_and_edits_reach_irc_the_irc_way(irc, connect) -> None:  # type: ignore[no-untyped-def]
    """A room's operator (bob, who opened it) sets the topic, edits and deletes his line,
    ops and deops, and kicks: the IRC user sees TOPIC, NOTICEs naming the lines, MODE
    and KICK (and the channel is gone from its list)."""
    bob = await connect("bob")
    await bob.join("mod")
    peer = await irc("alice")
    peer.send("JOIN #mod")
    await peer.cmd("366")
    stored = await bob.send("mod", "teh line")
    await peer.expect(lambda x: x.command == "PRIVMSG" and x.params == ("#mod", "teh line"))
    await bob.set_topic("mod", "release day")
    topic = await peer.cmd("TOPIC")
    assert topic.source.startswith("bob!") and topic.params == ("#mod", "release day")
    await bob.edit("mod", stored.seq, "the line")
    edit = await peer.cmd("NOTICE")
    assert edit.source.startswith("bob!") and edit.params == ("#mod", f"(edited line {stored.seq}) the line")
    await bob.delete_own("mod", stored.seq)
    gone = await peer.cmd("NOTICE")
    assert gone.params == ("#mod", f"(deleted line {stored.seq})")
    await bob.op("mod", "alice")
    mode = await peer.cmd("MODE")
    assert mode.params == ("#mod", "+o", "alice")
    await bob.deop("mod", "alice")
    assert (await peer.cmd("MODE")).params == ("#mod", "-o", "alice")
    await bob.kick("mod", "alice", "spam")
    kick = await peer.cmd("KICK")
    assert kick.source.startswith("bob!") and kick.params == ("#mod", "alice", "spam")
