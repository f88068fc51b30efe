"""Peers that ignore retry_after: past a number of refusals in a window the broker cuts
their connections and refuses their key for a cool-off; a heavy user that backs off as
told is never cut. Real CURVE broker on 127.0.0.1, raw CURVE peers for the flooder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import pytest
import zmq

from tests.conftest import HEARTBEAT, TEST_EDGE, RunningBroker, wait_for
from tests.integration.raw import SECRET, Raw, claim
from zchat import protocol as p
from zchat.client import Client, ClientError
from zchat.core import Limits

LIMITS = Limits(heartbeat=HEARTBEAT, rate=20, burst=40)
EDGE = dataclasses.replace(TEST_EDGE, max_refusals=50, refusal_window=10.0, cooloff=2.0)


async def start(tmp_path: Path) -> RunningBroker:
    return await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path, guard=EDGE).start()


async def flooder(running: RunningBroker, name: str = "flood") -> tuple[Raw, Raw, str]:
    """A claimed name's DEALER (with a session, in room spam) and PUSH."""
    broker = running.broker
    assert broker is not None
    assert await claim(broker.endpoint, name, SECRET, broker.public_key) == zmq.EVENT_HANDSHAKE_SUCCEEDED
    dealer = Raw(broker.endpoint, name, SECRET, server_key=broker.public_key, routing_id=f"{name}-session-0001".encode())
    assert await dealer.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
    assert isinstance(await dealer.request(p.Hello(rid=1, client="flood")), p.Welcome)
    assert isinstance(await dealer.request(p.Join(rid=2, room="spam")), p.Joined)
    push = Raw(f"tcp://127.0.0.1:{broker.ports[1]}", name, SECRET, kind=zmq.PUSH, server_key=broker.public_key)
    assert await push.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
    return dealer, push, dealer.sock.routing_id.decode("latin-1")


async def test_a_peer_flooding_past_retry_after_is_cut_and_cools_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """fails on main: the broker refused every line (rate_limited) and kept reading the
    flood for as long as the peer sent it; nothing was cut."""
    caplog.set_level(logging.INFO, logger="zchat")
    running = await start(tmp_path)
    broker = running.broker
    assert broker is not None
    alice = Client(broker.address, "alice", "secret-of-alice-0123456789")
    await alice.connect()
    await alice.join("lobby")
    dealer, push, sid = await flooder(running)
    try:
        for i in range(200):  # 40 fit the bucket; the rest are refused, and it never waits
            sock = dealer if i % 2 else push
            await sock.sock.send(p.encode(p.Send(sid=sid, cid=f"f{i}", room="spam", text=f"flood {i}")))
            if i % 50 == 0:
                assert (await alice.send("lobby", f"alice {i}")).room == "lobby"  # acked all along
        await dealer.wait_event(zmq.EVENT_DISCONNECTED)
        await push.wait_event(zmq.EVENT_DISCONNECTED)
        cut_at = time.monotonic()
        again = Raw(broker.endpoint, "flood", SECRET, server_key=broker.public_key)
        try:
            assert await again.handshake() == zmq.EVENT_HANDSHAKE_FAILED_AUTH  # cooling off
        finally:
            again.close()
        assert time.monotonic() < cut_at + 2.0  # that refusal was within the cool-off
        assert (await alice.send("lobby", "alice after the cut")).room == "lobby"
        cuts = [r.getMessage() for r in caplog.records if "ignores retry_after" in r.getMessage()]
        assert len(cuts) == 1 and "'flood'" in cuts[0], cuts  # logged once
        # After the cool-off the key is welcome again.
        back = None
        deadline = time.monotonic() + 10
        while back is None:
            peer = Raw(broker.endpoint, "flood", SECRET, server_key=broker.public_key)
            if await peer.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                back = peer
            else:
                peer.close()
                assert time.monotonic() < deadline, "still refused long after the cool-off"
                await asyncio.sleep(0.2)  # between attempts, not a wait for an event
        assert isinstance(await back.request(p.Ping(rid=9)), (p.Pong, p.Error))
        back.close()
    finally:
        dealer.close()
        push.close()
        await alice.close()
        await running.stop()


async def test_a_flood_of_big_lines_is_cut_after_fewer_refusals_than_one_of_short_lines(tmp_path: Path) -> None:
    """fails on main: every refusal weighed one, so 12 refused 32 KB lines (11 ignored,
    96 tokens' worth of lines read and decrypted) were far from the limit of 50. A
    refused line now weighs its tokens (8): the big flooder is cut, the short one not."""
    running = await start(tmp_path)
    short_dealer, short_push, short_sid = await flooder(running, "short")
    big_dealer, big_push, big_sid = await flooder(running, "big")
    big = "y" * 32 * 1024
    try:
        # The join took a token of 40: 39 short lines fit, 6 refused (5 ignored: 5 of 50).
        for i in range(45):
            await short_push.sock.send(p.encode(p.Send(sid=short_sid, cid=f"s{i}", room="spam", text=f"short {i}")))
        acked, refused = 0, []
        while acked + len(refused) < 45:  # acks come a turn's lines together
            reply = p.decode_reply(await asyncio.wait_for(short_dealer.sock.recv(), 10))
            if isinstance(reply, p.Ack):
                acked += len(reply.stored)
            else:
                refused.append(reply)
        assert acked + len(refused) == 45 and len(refused) >= 6
        assert all(r.code == p.ErrorCode.RATE_LIMITED for r in refused)
        assert isinstance(await short_dealer.request(p.Ping(rid=9)), p.Pong)  # every line taken: not cut
        # 39 tokens: 4 big lines fit (8 each), 13 refused (12 ignored x 8 = 96 >= 50).
        for i in range(17):
            await big_push.sock.send(p.encode(p.Send(sid=big_sid, cid=f"b{i}", room="spam", text=big)))
        await big_dealer.wait_event(zmq.EVENT_DISCONNECTED)
        await big_push.wait_event(zmq.EVENT_DISCONNECTED)
        again = Raw(running.broker.endpoint, "big", SECRET, server_key=running.broker.public_key)  # type: ignore[union-attr]
        try:
            assert await again.handshake() == zmq.EVENT_HANDSHAKE_FAILED_AUTH  # cooling off
        finally:
            again.close()
        assert isinstance(await short_dealer.request(p.Ping(rid=10)), p.Pong)
    finally:
        for sock in (short_dealer, short_push, big_dealer, big_push):
            sock.close()
        await running.stop()


async def test_a_heavy_user_that_backs_off_as_told_is_never_cut(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bot bursting its whole bucket, then sending flat out and waiting retry_after
    whenever it is refused: refused more often than the limit, and never cut (it never
    ignored what it was told)."""
    caplog.set_level(logging.INFO, logger="zchat")
    running = await start(tmp_path)
    broker = running.broker
    assert broker is not None
    bot = Client(broker.address, "bot", "secret-of-bot-0123456789")
    await bot.connect()
    await bot.join("news")
    try:
        stored = refused = 0
        # The join took a token: the rest of the bucket (39) at once.
        burst = await asyncio.gather(*[bot.post("news", f"burst {i}") for i in range(39)], return_exceptions=True)
        stored += sum(1 for r in burst if isinstance(r, p.Stored))
        for i in range(80):  # then on at whatever pace the broker tells it
            while True:
                try:
                    await bot.send("news", f"paced {i}")
                    stored += 1
                    break
                except ClientError as exc:
                    assert exc.code == p.ErrorCode.RATE_LIMITED
                    refused += 1
                    await asyncio.sleep(exc.retry_after)  # as told
        assert stored == 119
        assert refused > EDGE.max_refusals  # counting every refusal would have cut it
        await bot.ping()
        assert bot.state == "connected"
        assert not [r for r in caplog.records if "ignores retry_after" in r.getMessage()]
    finally:
        await bot.close()
        await running.stop()


async def test_an_address_whose_handshakes_keep_being_refused_is_cut_at_accept(tmp_path: Path) -> None:
    """fails on main: every refused handshake cost the broker a CURVE handshake and a
    ZAP decision, for as long as the address kept trying."""
    running = await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path, registration="closed", guard=EDGE).start()
    broker = running.broker
    assert broker is not None and broker.guard is not None
    try:
        refused = 0
        for i in range(5):  # a tenth of max_refusals: ZAP refusals cost a CURVE handshake each
            verdict = await claim(broker.endpoint, f"new{i}", SECRET, broker.public_key, source="127.0.0.11")
            refused += verdict == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert refused == 5
        await wait_for(lambda: broker.guard.barred.get("127.0.0.11", 0) > time.monotonic(), what="the address to be barred")  # type: ignore[union-attr]
        cut = Raw(broker.endpoint, None, server_key=broker.public_key, source="127.0.0.11")
        try:
            assert await cut.handshake() != zmq.EVENT_HANDSHAKE_SUCCEEDED  # cut at accept, before any handshake
        finally:
            cut.close()
        assert broker.guard.cut["cooling"] >= 1
        other = Raw(broker.endpoint, None, server_key=broker.public_key, source="127.0.0.12")
        try:
            assert await other.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED  # another address is served
        finally:
            other.close()
    finally:
        await running.stop()
