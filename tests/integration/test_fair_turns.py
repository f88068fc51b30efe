"""A normal user's line is not served after every big line queued ahead of it: the
broker reads its inputs ahead and takes from them fairly by sender (zchat.broker.fair).

Two users flood over 16 connections, each with 3 lines of 30 KB queued, while the
broker's loop is held in a store; then a normal user sends one small line. libzmq hands
the broker one frame a connection in turn, so without the fair queue the normal line
came after one line of each flooding connection (16); now it is taken in the first turn.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import zmq

from tests.conftest import HEARTBEAT, TEST_EDGE, RunningBroker
from tests.integration.raw import Raw
from zchat import protocol as p
from zchat.broker.fair import FairQueue
from zchat.broker.inputs import QUANTUM, READ_AHEAD_FRAMES
from zchat.core import Limits

CONNECTIONS = 16
LINES = 3  # per connection
TEXT = "x" * 30_000
ROOM = "busy"
FLOODERS = ("flood", "flood2")  # two users: past its bound the queue refuses whoever is over its share


def _tcp_queues(port: int) -> list[tuple[int, int]]:
    """(tx_queue, rx_queue) of every loopback TCP socket from or to ``port``."""
    queues = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, tx_rx = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == port or int(remote.split(":")[1], 16) == port:
            tx, rx = tx_rx.split(":")
            queues.append((int(tx, 16), int(rx, 16)))
    return queues


async def _delivered(port: int, timeout: float = 20.0) -> None:
    """Wait until every byte sent to or from ``port`` left the kernel's queues (so the
    broker's libzmq holds it: its I/O thread reads on while the loop is held)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while any(tx or rx for tx, rx in _tcp_queues(port)):
        assert loop.time() < deadline, f"still queued in the kernel: {_tcp_queues(port)}"
        await asyncio.sleep(0.02)


async def _hello(peer: Raw, room: str) -> None:
    assert isinstance(await peer.request(p.Hello(rid=1)), p.Welcome)
    assert isinstance(await peer.request(p.Join(rid=2, room=room)), p.Joined)


async def _answers(peer: Raw, want: int, timeout: float = 30.0) -> tuple[dict[str, int], set[str]]:
    """The next ``want`` lines answered to ``peer``: cid -> seq of those stored, and the
    cids refused rate_limited (nothing else is expected)."""
    stored: dict[str, int] = {}
    refused: set[str] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(stored) + len(refused) < want:
        left = deadline - loop.time()
        assert left > 0, f"{len(stored)} stored and {len(refused)} refused of {want}"
        reply = p.decode_reply(await asyncio.wait_for(peer.sock.recv(), left))
        if isinstance(reply, p.Error):
            assert reply.code == p.ErrorCode.RATE_LIMITED and reply.cid and reply.retry_after > 0, reply
            refused.add(reply.cid)
            continue
        assert isinstance(reply, p.Ack), reply
        for item in reply.stored:
            assert isinstance(item, p.Stored), item
            stored[item.cid] = item.seq
    return stored, refused


async def _flood_then_one_line(broker: RunningBroker, after: bool = False) -> tuple[int, dict[str, int], set[str]]:
    """Hold the loop in a store; queue CONNECTIONS x LINES big lines of one user, then
    one small line of another; let go. Return the small line's seq, and the big lines
    stored (cid -> seq) and refused."""
    assert broker.broker is not None
    port = broker.broker.ports[0]
    floods = [Raw(broker.endpoint, FLOODERS[i % len(FLOODERS)], routing_id=f"flood-{i}".encode()) for i in range(CONNECTIONS)]
    normal = Raw(broker.endpoint, "normal", routing_id=b"normal-session")
    engine = broker.broker.engine
    real_store = engine.store
    held, release = asyncio.Event(), asyncio.Event()

    async def held_store(core, out):  # type: ignore[no-untyped-def]
        if out.store and not release.is_set():
            held.set()
            await release.wait()
        await real_store(core, out)

    try:
        for peer in [*floods, normal]:
            await _hello(peer, ROOM)
        engine.store = held_store  # type: ignore[method-assign]
        await floods[0].sock.send(p.encode(p.Send(sid="flood-0", cid="hold", text="hold", room=ROOM)))
        await asyncio.wait_for(held.wait(), 10)  # the loop is held in that line's store
        for n in range(LINES):
            for i, peer in enumerate(floods):
                await peer.sock.send(p.encode(p.Send(sid=f"flood-{i}", cid=f"f{i}-{n}", text=f"{i} {n} {TEXT}", room=ROOM)))
        await _delivered(port)
        await normal.sock.send(p.encode(p.Send(sid="normal-session", cid="normal", text="hello", room=ROOM)))
        await _delivered(port)
        release.set()
        mine, _ = await _answers(normal, 1)
        stored: dict[str, int] = {}
        refused: set[str] = set()
        for i, peer in enumerate(floods):
            got, no = await _answers(peer, LINES + (1 if i == 0 else 0))
            stored.update(got)
            refused |= no
        if after:  # every flooding connection still answered: none was cut for its refusals
            for i, peer in enumerate(floods):
                assert isinstance(await peer.request(p.Ping(rid=100 + i)), p.Pong), f"connection {i} was cut"
    finally:
        engine.store = real_store  # type: ignore[method-assign]
        for peer in [*floods, normal]:
            peer.close()
    assert "normal" in mine, "the normal user's line was refused"
    return mine["normal"], stored, refused


def _check(mine: int, stored: dict[str, int], refused: set[str]) -> None:
    ahead = sorted(seq for cid, seq in stored.items() if cid != "hold" and seq < mine)
    # A turn's worth (TURN_BYTES: three 30 KB lines), two if the normal line reached the
    # broker's queue just after the first turn read it; without the fair queue, 16.
    assert len(ahead) <= 6, f"{len(ahead)} big lines were taken before the normal user's"
    # Nothing loosened: every line answered once (stored or refused), each connection's
    # stored in the order sent, and none after one of its own that was refused.
    assert len(stored) + len(refused) == CONNECTIONS * LINES + 1 and not set(stored) & refused
    for i in range(CONNECTIONS):
        kept = [n for n in range(LINES) if f"f{i}-{n}" in stored]
        assert kept == list(range(len(kept))), f"connection {i}: stored {kept}, after one of its own refused"
        seqs = [stored[f"f{i}-{n}"] for n in kept]
        assert seqs == sorted(seqs), (i, seqs)


async def test_a_small_line_is_taken_before_big_lines_queued_ahead_of_it(broker: RunningBroker) -> None:
    mine, stored, refused = await _flood_then_one_line(broker)
    assert not refused  # 1.4 MB: the queue holds it all
    _check(mine, stored, refused)


async def test_a_full_queue_still_takes_a_small_line_and_refuses_the_flood(broker: RunningBroker) -> None:
    """With the read-ahead queue bounded at 200 KB, the flood fills it: the normal line
    is still read (the queue reads past its bound) and taken at once; the flooding
    users, past their share, are refused rate_limited until their queue empties."""
    assert broker.broker is not None
    broker.broker.request_queue = FairQueue(QUANTUM, 200_000, READ_AHEAD_FRAMES)
    mine, stored, refused = await _flood_then_one_line(broker)
    assert refused and broker.broker.stats.backlog_bytes_max <= 2 * 200_000 + len(TEXT) + 200
    assert broker.core.counters.get("shed", 0) == len(refused)
    _check(mine, stored, refused)


async def test_refusals_of_a_full_queue_never_get_a_sender_cut(tmp_path: Path) -> None:
    """A client cannot help the frames it had in flight when the queue filled: those
    refusals weigh nothing toward the cut for ignoring retry_after (here at 4; the
    plaintext test broker has no keys to cut, so the weights are read)."""
    running = await RunningBroker(
        tmp_path / "h.db", Limits(heartbeat=HEARTBEAT, rate=0), guard=dataclasses.replace(TEST_EDGE, max_refusals=4),
    ).start()
    try:
        assert running.broker is not None
        running.broker.request_queue = FairQueue(QUANTUM, 200_000, READ_AHEAD_FRAMES)
        mine, stored, refused = await _flood_then_one_line(running, after=True)
        assert len(refused) > 4, refused
        # What each flooder's refusals weighed toward the cut (guard.Refusals): nothing.
        weighed = {name: running.broker.refusals.counts.get(name, [0.0, 0.0])[1] for name in FLOODERS}
        assert weighed == dict.fromkeys(FLOODERS, 0.0), weighed
        _check(mine, stored, refused)
    finally:
        await running.stop()


async def test_frames_read_ahead_when_the_broker_stops_are_answered_shutting_down(tmp_path: Path) -> None:
    """A request read ahead but not yet taken when the broker stops is answered, as one
    still in libzmq's queue is: the client learns at once, not at its timeout."""
    running = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=HEARTBEAT, rate=0)).start()
    peer = Raw(running.endpoint, "normal", routing_id=b"normal-session")
    try:
        await _hello(peer, ROOM)
        assert running.broker is not None
        body = p.encode(p.Ping(rid=7))
        frames = [zmq.Frame(b"normal-session"), zmq.Frame(body)]
        running.broker.request_queue.put("normal", len(body), (frames, "normal", len(body)))
        await running.stop()  # no await between: the loop cannot take it first
        reply = p.decode_reply(await asyncio.wait_for(peer.sock.recv(), 5))
        assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.SHUTTING_DOWN, reply
    finally:
        peer.close()
