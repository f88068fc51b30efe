"""A loop turn is bounded in bytes as well as in frames: a flood of big lines is taken
a few hundred KiB a turn (every line still stored once, in order), so one turn's
storing and publishing never makes everyone else wait for megabytes."""

from __future__ import annotations

import asyncio
import threading

import zmq
import zmq.asyncio

from tests.conftest import RunningBroker
from zchat import protocol as p
from zchat.broker.inputs import TURN_BYTES

SENDERS = 4
LINES = 40  # per sender: 160 lines of 30 KB, about 4.7 MiB in all
TEXT = "x" * 30_000
CREDS = (b"flood", b"secret-of-flood-0123456789")


def _push_flood(port: int, sid: str, sender: int) -> None:
    """One PUSH connection of ``flood`` sending its LINES as fast as the socket takes them."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.plain_username, push.plain_password = CREDS
    push.connect(f"tcp://127.0.0.1:{port}")
    try:
        for i in range(LINES):
            push.send(p.encode(p.Send(sid=sid, cid=f"s{sender}-{i}", text=f"{sender} {i} {TEXT}", room="busy")))
        push.linger = 10_000  # what is queued still goes out
    finally:
        push.close()
        ctx.term()


async def test_a_flood_of_big_lines_is_taken_a_bounded_number_of_bytes_a_turn(broker: RunningBroker) -> None:
    assert broker.broker is not None
    ctx = zmq.asyncio.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.routing_id = b"flood-session"
    dealer.plain_username, dealer.plain_password = CREDS
    dealer.connect(f"tcp://127.0.0.1:{broker.broker.ports[0]}")
    threads: list[threading.Thread] = []
    try:
        for rid, req, kind in ((1, p.Hello(rid=1), p.Welcome), (2, p.Join(rid=2, room="busy"), p.Joined)):
            await dealer.send(p.encode(req))
            assert await dealer.poll(5000), f"no reply to request {rid}"
            assert isinstance(p.decode_reply(await dealer.recv()), kind)
        threads = [
            threading.Thread(target=_push_flood, args=(broker.broker.ports[1], "flood-session", i)) for i in range(SENDERS)
        ]
        for t in threads:
            t.start()
        acked: dict[str, int] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        head = broker.core.heads.get("busy", 0)  # the join's line
        while len(acked) < SENDERS * LINES:
            left = deadline - loop.time()
            assert left > 0, (
                f"only {len(acked)} of {SENDERS * LINES} lines acked; read ahead: {len(broker.broker.chat_queue)} lines, "
                f"stored {broker.broker.stats.stored}, head {broker.core.heads.get('busy')}, received {broker.broker.stats.received}, "
                f"acks sent {broker.broker.stats.acks}, counters {broker.broker.core.counters}"  # type: ignore[union-attr]
            )
            if not await dealer.poll(int(min(left, 0.5) * 1000)):
                # Every line stored and no ack for 0.5 s: the rest were dropped at the
                # ROUTER's send queue (16 replies a peer; the reference client resends
                # an unacked line, and dedup answers it). Seen about once in 100 runs.
                if broker.core.heads.get("busy", 0) >= head + SENDERS * LINES:
                    break
                continue
            reply = p.decode_reply(await dealer.recv())
            assert isinstance(reply, p.Ack), reply
            for item in reply.stored:
                assert isinstance(item, p.Stored), item
                acked[item.cid] = item.seq
    finally:
        for t in threads:
            t.join(30)
        dealer.close(linger=0)
    # The bound: TURN_BYTES, plus the one frame an input takes past it (a body is at
    # most max_bytes; a frame up to twice that is read to be refused as too large).
    most = broker.broker.stats.turn_bytes_max
    assert 30_000 < most <= TURN_BYTES + 2 * broker.limits.max_bytes, most
    # Nothing loosened: each line stored once, each sender's lines in the order sent.
    history = await _all(broker, "busy")
    texts = [m.text.split(" ", 2)[:2] for m in history if m.kind == "text"]
    assert len(texts) == SENDERS * LINES
    for sender in range(SENDERS):
        assert [int(i) for s, i in texts if s == str(sender)] == list(range(LINES))
    assert set(acked.values()) <= {m.seq for m in history if m.kind == "text"} and len(acked) >= SENDERS * LINES // 2


async def _all(broker: RunningBroker, room: str) -> list[p.Msg]:
    """Every stored message of ``room``, read straight from storage, page by page."""
    assert broker.broker is not None
    msgs: list[p.Msg] = []
    after = 0
    while True:
        page = await broker.broker.storage.range(room, after, 100)
        if not page:
            return msgs
        msgs += page
        after = page[-1].seq
