"""The web gateway without a browser: sign-in, cookies, Origin, and the WebSocket
protocol (docs/web.md) against a real broker, with aiohttp clients as the tabs."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import aiohttp
import pytest
from yarl import URL

from tests.conftest import RunningBroker, chat, wait_for
from tests.web.conftest import PASSWORD, RunningWeb, since_of
from zchat import protocol as p
from zchat.web.app import WRONG
from zchat.web.sessions import COOKIE


async def signed_up(users, *names: str) -> list:  # type: ignore[no-untyped-def]
    out = []
    for name in names:
        user = users(name)
        status, body = await user.signup()
        assert status == 200, body
        out.append(user)
    return out


async def test_two_web_users_and_a_zchat_client_share_a_room_and_dms(users, connect) -> None:
    alice, bob = await signed_up(users, "alice", "bob")
    ta, tb = await alice.tab(), await bob.tab()
    assert [r["room"] for r in ta.of("welcome")[0]["rooms"]] == ["general"]
    carol = await connect("carol")
    await carol.join("general")
    await ta.send(t="send", ref="r1", room="general", text="hi from alice")
    await ta.until(lambda t: t.of("sent"), what="sent")
    await carol.send("general", "hi from carol")
    await tb.send(t="send", ref="r2", room="general", text="hi from bob")
    want = ["hi from alice", "hi from carol", "hi from bob"]
    for tab in (ta, tb):
        await tab.until(lambda t: t.texts("general") == want, what="three lines in order")
    senders = [m["sender"] for m in sorted(tb.messages("general"), key=lambda m: m["seq"]) if m["kind"] == "text"]
    assert senders == ["alice", "carol", "bob"]
    got = await chat(carol, 3)
    assert [(m.sender, m.text) for m in got] == [("alice", "hi from alice"), ("carol", "hi from carol"), ("bob", "hi from bob")]
    # a DM from the web, one to the web
    await ta.send(t="send", ref="d1", to="bob", text="psst bob")
    dm = p.dm_room("alice", "bob")
    await tb.until(lambda t: t.texts(dm) == ["psst bob"], what="the DM")
    await carol.send_dm("alice", "psst alice")
    await ta.until(lambda t: t.texts(p.dm_room("alice", "carol")) == ["psst alice"], what="carol's DM")


async def test_wrong_password_and_unknown_name_get_the_same_answer(users) -> None:
    await signed_up(users, "alice")
    wrong = await users("alice").signin("not the password")
    unknown = await users("nobody").signin(PASSWORD)
    assert wrong == unknown == (401, {"error": WRONG})
    status, body = await users("alice").signin()
    assert status == 200 and body == {"name": "alice"}


async def test_a_name_taken_at_the_broker_is_refused_and_leaves_no_account(users, connect, site: RunningWeb) -> None:
    await connect("carol")  # a terminal user owns the name
    status, body = await users("carol").signup()
    assert status == 409 and "taken" in body["error"]
    assert "carol" not in site.config.accounts
    assert (await users("carol").signin())[0] == 401
    await signed_up(users, "alice")
    status, body = await users("alice").signup(password="another password")
    assert status == 409 and "taken" in body["error"]


async def test_bad_signup_input_is_refused_clearly(users) -> None:
    status, body = await users("<script>").signup()
    assert status == 400 and "bad name" in body["error"]
    status, body = await users("dave").signup(password="short")
    assert status == 400 and "at least" in body["error"]


async def test_session_cookie_flags(users, broker: RunningBroker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def set_cookie(site: RunningWeb, name: str) -> str:
        body = {"name": name, "password": PASSWORD}
        async with aiohttp.ClientSession() as http, http.post(site.url + "/api/signup", json=body, headers={"Origin": site.url}) as resp:
            assert resp.status == 200
            return resp.headers["Set-Cookie"]

    plain = await RunningWeb(broker, tmp_path / "a").start()
    try:
        header = await set_cookie(plain, "erin")
    finally:
        await plain.stop()
    assert header.startswith(COOKIE + "=")
    flags = [f.strip().lower() for f in header.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "secure" not in flags
    tls = await RunningWeb(broker, tmp_path / "b", secure_cookies=True).start()
    try:
        header = await set_cookie(tls, "frank")
    finally:
        await tls.stop()
    assert "secure" in [f.strip().lower() for f in header.split(";")]


async def test_origin_is_checked(users, site: RunningWeb) -> None:
    (alice,) = await signed_up(users, "alice")
    for origin in ("http://evil.example", "null", site.url.replace("127.0.0.1", "localhost")):
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await alice.http.ws_connect(site.url + "/ws", headers={"Origin": origin})
        assert err.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:  # no Origin at all
        await alice.http.ws_connect(site.url + "/ws")
    assert err.value.status == 403
    assert (await alice.post("/api/signin", origin="http://evil.example", name="alice", password=PASSWORD))[0] == 403
    assert (await alice.post("/api/signout", origin="http://evil.example"))[0] == 403
    await alice.tab()  # the page's own origin still works


async def test_no_cookie_no_websocket(site: RunningWeb) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(site.url + "/ws", headers={"Origin": site.url})
        assert err.value.status == 401
        async with http.get(site.url + "/api/me") as resp:
            assert resp.status == 401


async def test_a_reconnecting_tab_gets_exactly_what_it_missed(users, connect) -> None:
    alice, bob = await signed_up(users, "alice", "bob")
    ta = await alice.tab()
    tb = await bob.tab()
    for i in range(3):
        await tb.send(t="send", ref=f"a{i}", room="general", text=f"before {i}")
    await ta.until(lambda t: len(t.texts("general")) == 3, what="3 lines")
    since = since_of(ta)
    await ta.close()
    carol = await connect("carol")
    await carol.join("general")
    for i in range(5):
        await carol.send("general", f"missed {i}")
    await tb.until(lambda t: len(t.texts("general")) == 5 + 3, what="8 lines at bob")
    again = await alice.tab(since=since)
    await tb.send(t="send", ref="after", room="general", text="after")
    await again.until(lambda t: "after" in t.texts("general"), what="the live line")
    assert again.texts("general") == [f"missed {i}" for i in range(5)] + ["after"]
    assert not [f for f in again.of("reset") if f["room"] == "general"]  # a continuation, not the newest page
    seqs = [m["seq"] for m in again.messages("general")]
    assert len(seqs) == len(set(seqs))


async def test_a_fresh_tab_gets_the_newest_then_older_pages(users, connect) -> None:
    (alice,) = await signed_up(users, "alice")
    carol = await connect("carol")
    await carol.join("general")
    for i in range(60):
        carol.post("general", f"line {i}")
    last = (await carol.send("general", "line 60")).seq
    # The tab's page is cut at what alice's gateway session has seen: wait until that is
    # line 60 (the fan-out to it can trail carol's ack; CI once opened the tab at seq 2).
    hub = alice.site.gateway.users["alice"]
    await wait_for(lambda: hub.client.cursors().get("general", ("", 0))[1] >= last, what="alice's session at line 60")
    tab = await alice.tab()
    first = await tab.until(lambda t: [f for f in t.of("replay") if f["room"] == "general"], what="replay")
    reset = [f for f in tab.of("reset") if f["room"] == "general"]
    assert len(reset) == 1 and reset[0]["more"] and len(first[0]["items"]) == 50  # type: ignore[index]
    oldest = first[0]["items"][0]["seq"]  # type: ignore[index]
    await tab.send(t="history", room="general", before=oldest, limit=50)
    older = await tab.until(lambda t: t.of("older"), what="older")
    assert older[0]["more"] is False  # type: ignore[index]
    assert tab.texts("general") == [f"line {i}" for i in range(61)]


async def test_the_same_ref_is_one_line_even_from_another_tab(users, connect) -> None:
    (alice,) = await signed_up(users, "alice")
    carol = await connect("carol")
    await carol.join("general")
    t1 = await alice.tab()
    await t1.send(t="send", ref="same", room="general", text="once")
    await t1.until(lambda t: t.of("sent"))
    t2 = await alice.tab()
    await t2.send(t="send", ref="same", room="general", text="once")
    await t2.send(t="send", ref="other", room="general", text="marker")
    sent = await t2.until(lambda t: len(t.of("sent")) == 2 and t.of("sent"))
    assert sent[0]["seq"] == t1.of("sent")[0]["seq"]  # type: ignore[index]
    got = await chat(carol, 2)
    assert [m.text for m in got] == ["once", "marker"]


async def test_bad_frames_are_errors_and_the_tab_lives_on(users) -> None:
    (alice,) = await signed_up(users, "alice")
    tab = await alice.tab()
    for bad in ("not json", json.dumps({"t": "nope"}), json.dumps({"t": "send", "ref": "x"}),
                json.dumps({"t": "history", "room": "general", "before": -1}), json.dumps({"t": "send", "ref": "x", "text": "a", "evil": 1})):
        await tab.ws.send_str(bad)
    await tab.until(lambda t: len([f for f in t.of("error") if f["code"] == "bad_frame"]) == 5, what="5 errors")
    await tab.send(t="send", ref="ok", room="general", text="still here")
    await tab.until(lambda t: t.of("sent"))
    await tab.send(t="join", room="<img src=x onerror=alert(1)>")
    err = await tab.until(lambda t: [f for f in t.of("error") if f.get("about") == "join"], what="join refused")
    assert err[0]["code"] == "bad_room"  # type: ignore[index]


async def test_the_first_frame_must_be_hello(users) -> None:
    (alice,) = await signed_up(users, "alice")
    tab = await alice.tab(hello=False)
    await tab.send(t="send", ref="x", room="general", text="no hello")
    await tab.until(lambda t: t.closed_with is not None, what="close")
    assert tab.closed_with == 1008


async def test_tabs_per_user_are_capped(users, broker: RunningBroker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.web.conftest import User

    capped = await RunningWeb(broker, tmp_path / "c").start(max_tabs=2)
    try:
        user = User(capped, "alice")
        assert (await user.signup())[0] == 200
        await user.tab()
        await user.tab()
        third = await user.tab(hello=False)
        await third.send(t="hello", since={})
        await third.until(lambda t: t.closed_with is not None, what="close")
        assert third.closed_with == 4003
        await user.close()
    finally:
        await capped.stop()


async def test_sign_out_closes_the_tabs_and_the_cookie(users) -> None:
    (alice,) = await signed_up(users, "alice")
    tab = await alice.tab()
    assert (await alice.post("/api/signout"))[0] == 200
    await tab.until(lambda t: t.closed_with is not None, what="close")
    assert tab.closed_with == 4001
    async with alice.http.get(alice.site.url + "/api/me") as resp:
        assert resp.status == 401


async def test_sign_in_is_rate_limited(users) -> None:
    await signed_up(users, "alice")  # one attempt of the burst of 5
    answers = [(await users("alice").signin("wrong password"))[0] for _ in range(6)]
    assert answers[:4] == [401] * 4 and 429 in answers[4:]


async def test_a_slow_tab_is_dropped_and_catches_up(users, connect, broker: RunningBroker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.web.conftest import User

    small = await RunningWeb(broker, tmp_path / "s", tab_queue_bytes=256 * 1024).start()
    try:
        user = User(small, "alice")
        assert (await user.signup())[0] == 200
        fast = await user.tab()
        since = since_of(fast)
        await fast.close()
        cookie = user.http.cookie_jar.filter_cookies(URL(small.url))[COOKIE].value
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader on a thin link
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", int(small.url.rsplit(":", 1)[1])))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write((f"GET /ws HTTP/1.1\r\nHost: {small.url[7:]}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: {small.url}\r\n"
                      f"Cookie: {COOKIE}={cookie}\r\n\r\n").encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writer.write(_masked_text(json.dumps({"t": "hello", "since": since})))  # and then it never reads again
        hub = small.gateway.users["alice"]
        await asyncio.wait_for(_until(lambda: len(hub.tabs) == 1), 10)
        (tab,) = hub.tabs  # the gateway's end of that link is thin too: the kernel holds little for it
        tab.ws._req.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[union-attr]
        carol = await connect("carol")
        await carol.join("general")
        big = "x" * 50_000
        for i in range(60):  # 3 MB: more than the kernel buffers and the tab's budget
            await carol.send("general", f"{i} {big}")
        await asyncio.wait_for(_until(lambda: not hub.tabs), 30)  # dropped, not buffered without end
        writer.close()
        again = await user.tab(since=since)
        await again.until(lambda t: len(t.texts("general")) == 60, timeout=30, what="all 60 lines")
        assert [t.split()[0] for t in again.texts("general")] == [str(i) for i in range(60)]
        await user.close()
    finally:
        await small.stop()


def _masked_text(text: str) -> bytes:
    """One client-to-server WebSocket text frame (masked, as RFC 6455 wants)."""
    data = text.encode()
    mask = os.urandom(4)
    head = bytes([0x81]) + (bytes([0x80 | len(data)]) if len(data) < 126 else bytes([0x80 | 126]) + len(data).to_bytes(2, "big"))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def _until(pred) -> None:  # type: ignore[no-untyped-def]
    while not pred():
        await asyncio.sleep(0.01)


@pytest.mark.slow
async def test_broker_restart_shows_reconnecting_and_a_line_typed_meanwhile_goes_once(users, broker: RunningBroker) -> None:
    alice, bob = await signed_up(users, "alice", "bob")
    ta, tb = await alice.tab(), await bob.tab()
    await broker.stop()
    await ta.until(lambda t: any(i["t"] == "state" and i["state"] == "reconnecting" for f in t.of("events") for i in f["items"]),
                   timeout=20, what="reconnecting")
    await ta.send(t="send", ref="typed", room="general", text="typed while down")
    await broker.start()
    await ta.until(lambda t: t.of("sent"), timeout=30, what="sent after the restart")
    await tb.until(lambda t: "typed while down" in t.texts("general"), timeout=30, what="the line at bob")
    await tb.send(t="send", ref="marker", room="general", text="marker")
    # Both tabs, each through its own Client: bob's fan-out socket may come back from the
    # restart after alice's (libzmq redials each socket on its own timer); until it does,
    # bob's lines come from history, a moment later. The marker ends the wait for a double.
    for tab in (ta, tb):
        await tab.until(lambda t: "marker" in t.texts("general"), timeout=15, what="the marker")
    assert ta.texts("general").count("typed while down") == 1
    assert tb.texts("general") == ["typed while down", "marker"]


async def test_a_user_without_tabs_goes_offline_after_the_grace(broker: RunningBroker, connect, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.web.conftest import User

    quick = await RunningWeb(broker, tmp_path / "q").start(idle_close=1.0)
    try:
        user = User(quick, "alice")
        assert (await user.signup())[0] == 200
        carol = await connect("carol")
        await carol.join("general")
        tab = await user.tab()
        hub = quick.gateway.users["alice"]
        await tab.close()
        again = await user.tab()  # a reload within the grace: the same client
        assert quick.gateway.users["alice"] is hub
        await again.close()
        await asyncio.wait_for(_until(lambda: "alice" not in quick.gateway.users and hub.client.state == "closed"), 10)
        online = {m.name: m.online for m in await carol.who("general")}
        assert online["alice"] is False  # it said bye: offline at once
        back = await user.tab()  # and back: a new client, the room as before
        await back.send(t="send", ref="b", room="general", text="back again")
        await back.until(lambda t: t.of("sent"))
        assert quick.gateway.users["alice"] is not hub
        await user.close()
    finally:
        await quick.stop()
