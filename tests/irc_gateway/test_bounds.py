"""The gateway's bounds over real sockets: a client that stops reading is dropped
(SendQ), a silent one is pinged then dropped, one that never registers is dropped."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.conftest import wait_for
from tests.irc_gateway.conftest import Peer
from zchat.irc import gateway as gw_module


async def test_a_client_that_stops_reading_is_dropped(irc, gateway, connect, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gw_module, "MAX_SENDQ", 64 * 1024)
    gw, _ = gateway
    bob = await connect("bob")
    await bob.join("general")
    peer = await irc("alice")
    peer.send("JOIN #general")
    await peer.cmd("366")
    conn = next(iter(gw.connections))
    conn.writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer._task.cancel()  # stop reading: from here the gateway's output piles up
    reader_sock = peer.writer.transport.get_extra_info("socket")
    reader_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for i in range(150):
        bob.post("general", f"{i} " + "y" * 3000)
    await wait_for(lambda: conn not in gw.connections, 30, "the gateway to drop the client that does not read")
    assert conn.closing
    # the other side is still fine
    assert bob.state == "connected"


async def test_silence_is_pinged_then_dropped(irc, gateway, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gw_module, "PING_AFTER", 0.4)
    peer = await irc("alice")
    ping = await peer.cmd("PING", timeout=10)
    assert ping.params == ("zchat",)
    err = await peer.cmd("ERROR", timeout=10)
    assert err.params == ("Ping timeout",)
    await wait_for(lambda: peer.closed, what="the connection to close")


async def test_answering_pings_keeps_the_connection(irc, gateway, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gw_module, "PING_AFTER", 0.4)
    peer = await irc("alice")
    for _ in range(3):
        ping = await peer.cmd("PING", timeout=10)
        peer.send(f"PONG :{ping.params[-1]}")
    await peer.marker()
    assert not [x for x in peer.lines if x.command == "ERROR"] and not peer.closed


async def test_registration_must_end_in_time(gateway, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gw_module, "REGISTER_WITHIN", 0.3)
    monkeypatch.setattr(gw_module, "PING_AFTER", 0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway[1])
    peer = Peer(reader, writer)
    peer.send("NICK alice")  # and never USER
    err = await peer.cmd("ERROR", timeout=10)
    assert err.params == ("Registration timeout",)
    await wait_for(lambda: peer.closed, what="the connection to close")
    await peer.close()


async def test_connections_per_address_are_bounded(broker) -> None:  # type: ignore[no-untyped-def]
    from tests.irc_gateway.conftest import open_peer, register
    from zchat.irc.server import Gateway
    from zchat.irc.signin import Gatekeeper

    gw = Gateway(broker.endpoint, Gatekeeper(None), max_per_address=2)
    port = await gw.start("127.0.0.1", 0)
    try:
        one, two = await open_peer(port), await open_peer(port)
        await register(one, "alice")
        await register(two, "bob")
        three = await open_peer(port)
        err = await three.cmd("ERROR")
        assert "from your address" in err.params[0]
        await wait_for(lambda: three.closed, what="the third connection to be closed")
        one.send("QUIT")
        await wait_for(lambda: len(gw.connections) == 1, what="the first connection to go")
        four = await open_peer(port)  # room again
        await register(four, "carol")
        for peer in (one, two, three, four):
            await peer.close()
    finally:
        await gw.stop()
