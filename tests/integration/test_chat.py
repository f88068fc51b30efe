"""A real broker and real clients over TCP on 127.0.0.1: the core issue's scenarios."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable

import pytest
import zmq
import zmq.asyncio

from tests.conftest import HEARTBEAT, RunningBroker, chat, collect, wait_for
from zchat import protocol as p
from zchat.client import AuthError, Client, ClientError
from zchat.core import Limits

PEER = str(Path(__file__).with_name("peer.py"))


def texts(events: list) -> list[str]:
    return [e.text for e in events if isinstance(e, p.Msg) and e.kind == "text"]


async def test_three_users_two_rooms(connect) -> None:
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    for c in (alice, bob, carol):
        await c.join("general")
    await alice.join("dev")
    await bob.join("dev")
    await alice.send("general", "hi all")
    await carol.send("general", "hi alice")
    await bob.send("dev", "dev talk")
    got_carol = await chat(carol, 2)
    assert [(m.room, m.sender, m.text) for m in got_carol] == [("general", "alice", "hi all"), ("general", "carol", "hi alice")]
    got_alice = await chat(alice, 3)
    by_room = {(m.room, m.sender, m.text) for m in got_alice}
    assert by_room == {("general", "alice", "hi all"), ("general", "carol", "hi alice"), ("dev", "bob", "dev talk")}
    general = [m for m in got_alice if m.room == "general"]
    assert [m.seq for m in general] == sorted(m.seq for m in general)
    rooms = {r.name: (r.members, r.online) for r in await carol.rooms()}
    assert rooms == {"general": (3, 3), "dev": (2, 2)}


async def probe_until_received(sub: zmq.asyncio.Socket, probe: Callable[[int], Awaitable[object]], timeout: float = 10.0) -> None:
    """Send probes until the raw subscriber receives one: then its subscription is in
    effect (each poll is bounded; the loop has a deadline)."""
    deadline = time.monotonic() + timeout
    i = 0
    while time.monotonic() < deadline:
        await probe(i)
        i += 1
        if await sub.poll(250):
            return
    raise AssertionError(f"no probe reached the subscriber within {timeout}s")


async def read_until(sub: zmq.asyncio.Socket, text: str, timeout: float = 10.0) -> list[tuple[bytes, p.Msg]]:
    """Everything the raw subscriber receives up to and including the line ``text``."""
    got: list[tuple[bytes, p.Msg]] = []
    while not got or got[-1][1].text != text:
        assert await sub.poll(int(timeout * 1000)), f"{text!r} never came; got {got}"
        topic, body = await sub.recv_multipart()
        event = p.decode_event(body)
        for m in event.items if isinstance(event, p.Batch) else [event]:
            if isinstance(m, p.Msg):
                got.append((topic, m))
    return got


async def test_room_prefix_isolation(connect, broker) -> None:
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    await alice.join("dev")
    await bob.join("devops")
    await alice.join("devops")
    await carol.join("dev")  # carol is in dev only: devops reaching her would be a leak
    await alice.send("devops", "ops only")
    await alice.send("dev", "dev only")
    (msg,) = await chat(bob, 1)
    assert (msg.room, msg.text) == ("devops", "ops only")
    # A raw subscriber of carol's asking for bare prefixes gets nothing through them: the
    # broker refuses them. "#dev" would match "#devops\0" if it let it through.
    ctx = zmq.asyncio.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.plain_username, sub.plain_password = b"carol", b"secret-of-carol-0123456789"
    sub.connect(f"tcp://127.0.0.1:{broker.broker.ports[2]}")
    try:
        before = broker.core.counters.get("bad_subscription", 0)
        for prefix in (b"#dev", b"#", b"@", b""):
            sub.subscribe(prefix)
        await wait_for(lambda: broker.core.counters.get("bad_subscription", 0) >= before + 4, what="refused subscriptions")
        sub.subscribe(p.room_topic("dev"))  # her own room: the positive marker comes this way
        await probe_until_received(sub, lambda i: alice.send("dev", f"probe {i}"))
        await alice.send("devops", "ops only again")
        await alice.send("dev", "dev marker")
        got = await read_until(sub, "dev marker")
        assert {topic for topic, _ in got} == {p.room_topic("dev")}, f"a bare-prefix subscriber received other traffic: {got}"
        assert "ops only again" not in [m.text for _, m in got]
    finally:
        sub.close()


async def test_dm_reaches_only_recipient(connect, broker) -> None:
    alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
    for c in (alice, bob, carol):
        await c.join("general")
    # carol tries to eavesdrop on bob's inbox with a raw subscriber using her own credentials
    ctx = zmq.asyncio.Context.instance()
    spy = ctx.socket(zmq.SUB)
    spy.linger = 0
    spy.plain_username, spy.plain_password = b"carol", b"secret-of-carol-0123456789"
    spy.connect(f"tcp://127.0.0.1:{broker.broker.ports[2]}")
    spy.subscribe(p.inbox_topic("bob"))
    await wait_for(lambda: broker.core.counters.get("bad_subscription", 0) >= 1, what="spy refused")
    spy.subscribe(p.room_topic("general"))  # allowed: the positive marker comes this way
    await probe_until_received(spy, lambda i: alice.send("general", f"probe {i}"))
    stored = await alice.send_dm("bob", "secret plan")
    assert stored.room == "@alice:bob"
    (dm,) = await collect(bob, 1, where=lambda m: m.room == "@alice:bob")
    assert (dm.sender, dm.to, dm.text, dm.room) == ("alice", "bob", "secret plan", "@alice:bob")
    await alice.send("general", "public marker")
    got = await collect(carol, 1, where=lambda m: m.kind == "text" and not m.text.startswith("probe"))
    assert [m.text for m in got] == ["public marker"]
    seen = await read_until(spy, "public marker")
    assert "secret plan" not in [m.text for _, m in seen] and p.inbox_topic("bob") not in {t for t, _ in seen}
    spy.close()
    with pytest.raises(ClientError) as err:
        await carol.history("@alice:bob")
    assert err.value.code == p.ErrorCode.NOT_MEMBER
    with pytest.raises(ClientError) as err:
        await alice.send_dm("nobody", "hello?")
    assert err.value.code == p.ErrorCode.UNKNOWN_USER


async def test_me_action_is_its_own_kind(connect) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await bob.join("general")
    await alice.send("general", "waves", me=True)
    (msg,) = await chat(bob, 1)
    assert (msg.kind, msg.text, msg.sender) == ("me", "waves", "alice")


async def test_late_joiner_history_then_live(connect) -> None:
    alice = await connect("alice")
    await alice.join("general")
    for i in range(30):
        await alice.send("general", f"early {i}")
    late = await connect("late")
    await late.join("general", history=20)
    pump = asyncio.create_task(_send_many(alice, "general", "live", 30))
    got = await collect(late, 50)  # 20 of history (with late's own join line), then 30 live
    await pump
    seqs = [m.seq for m in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "gap or duplicate"
    assert texts(got)[:19] == [f"early {i}" for i in range(11, 30)]
    assert texts(got)[-30:] == [f"live {i}" for i in range(30)]


async def _send_many(client: Client, room: str, prefix: str, n: int) -> None:
    for i in range(n):
        await client.send(room, f"{prefix} {i}")


async def test_overflowing_subscriber_recovers_everything(tmp_path: Path) -> None:
    """A subscriber that stops reading loses messages at PUB; the library refills them."""
    running = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=5, rate=0, pub_hwm=4), secure=True, key_dir=tmp_path).start()
    try:
        address = running.broker.address  # type: ignore[union-attr]  # CURVE: the peer process gets the keyed address
        sender = Client(address, "flood", "secret-of-flood-0123456789")
        await sender.connect()
        await sender.join("firehose")
        total = 2500
        proc = subprocess.Popen([sys.executable, PEER, address, "slow", "firehose", "collect", str(total)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert await asyncio.to_thread(proc.stdout.readline) == "ready\n"
            os.kill(proc.pid, signal.SIGSTOP)
            text = "x" * 4000
            for start in range(0, total, 100):
                if start == 2000:  # enough to overflow every buffer; it catches up while live batches keep coming
                    os.kill(proc.pid, signal.SIGCONT)
                await asyncio.gather(*(sender.send("firehose", f"{i} {text}") for i in range(start, start + 100)))
            out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        summary = json.loads(out.strip().splitlines()[-1])
        seqs = summary["seqs"]
        assert len(seqs) == total and seqs == sorted(set(seqs)) and seqs == list(range(seqs[0], seqs[0] + total))
        assert summary["recovered"] > 0, "nothing was dropped, so recovery was not exercised"
        assert running.core.counters.get("batches", 0) > 0, "a flood should be published in batches"
        await sender.close()
    finally:
        await running.stop()


async def test_killed_client_reported_gone(connect, broker) -> None:
    watcher = await connect("watcher")
    await watcher.join("general")
    proc = subprocess.Popen([sys.executable, PEER, broker.endpoint, "ghost", "general", "idle"], stdout=subprocess.PIPE, text=True)
    try:
        assert await asyncio.to_thread(proc.stdout.readline) == "ready\n"
        assert {m.name: m.online for m in await watcher.who("general")}["ghost"] is True
        proc.kill()
        proc.wait()
        gone = await collect(watcher, 1, timeout=3 * HEARTBEAT + 5, kinds=(p.Presence,))
        assert (gone[0].name, gone[0].online) == ("ghost", False)
        assert {m.name: m.online for m in await watcher.who("general")}["ghost"] is False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_name_theft_refused(connect, broker) -> None:
    alice = await connect("alice")
    thief = Client(broker.endpoint, "alice", "not-alices-secret-0123456789")
    with pytest.raises(AuthError) as err:
        await thief.connect(timeout=5)
    assert "alice" in err.value.message
    await alice.join("general")
    stored = await alice.send("general", "still me")
    assert stored.seq >= 1


async def test_two_devices_one_user(connect) -> None:
    phone = await connect("dana", "dana-shared-secret-0123456789")
    laptop = await connect("dana", "dana-shared-secret-0123456789")
    eve = await connect("eve")
    for c in (phone, laptop, eve):
        await c.join("general")
    await eve.send_dm("dana", "to both devices")
    assert [m.text for m in await chat(phone, 1)] == ["to both devices"]
    assert [m.text for m in await chat(laptop, 1)] == ["to both devices"]
    members = await eve.who("general")
    assert [(m.name, m.online) for m in members if m.name == "dana"] == [("dana", True)]
    assert {r.name: r.online for r in await eve.rooms()}["general"] == 2
    await phone.close()
    await eve.send("general", "after phone left")
    await chat(laptop, 1)
    assert {m.name: m.online for m in await eve.who("general")}["dana"] is True


async def test_rate_limit_is_clear(tmp_path: Path) -> None:
    running = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=5, rate=1, burst=3)).start()
    try:
        client = Client(running.endpoint, "spammer", "secret-of-spammer-0123456789")
        await client.connect()
        await client.join("general")
        results = await asyncio.gather(*(client.send("general", f"m{i}") for i in range(6)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, ClientError)]
        assert len(results) - len(refused) == 2  # the join line took the first of the 3 tokens
        assert refused and all(r.code == p.ErrorCode.RATE_LIMITED for r in refused)
        await client.close()
    finally:
        await running.stop()


async def test_resends_are_stored_once(connect, broker) -> None:
    """Fails with Core's dedup lookup disabled (checked by a scratch edit): the raw line
    and every resent line are then stored twice."""
    # a raw DEALER sends one Send twice with the same cid: stored once, acked alike twice
    ctx = zmq.asyncio.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.routing_id = b"raw-session"
    dealer.plain_username, dealer.plain_password = b"raw", b"secret-of-raw-0123456789"
    dealer.connect(broker.endpoint)
    try:
        for req in (p.Hello(rid=1), p.Join(rid=2, room="general")):
            await dealer.send(p.encode(req))
            assert await dealer.poll(5000)
            await dealer.recv()
        line = p.encode(p.Send(sid="raw-session", cid="same-cid", text="raw once", room="general"))
        await dealer.send(line)
        await dealer.send(line)
        acks: list = []
        while sum(len(a.stored) for a in acks) < 2:
            assert await dealer.poll(5000), f"missing acks: {acks}"
            acks.append(p.decode_reply(await dealer.recv()))
        first, second = [s for a in acks for s in a.stored]
        assert first == second
    finally:
        dealer.close()
    # a client whose first ack of each line is lost resends it; the broker keeps one copy
    eager = await connect("eager", ack_timeout=0.2)
    await eager.join("general")
    eager._own = lambda msg: None  # type: ignore[method-assign]  # its own line on SUB must not stand in for the ack
    acked, lost = eager._acked, set()

    def lossy(cid: str, stored: p.Stored) -> None:
        if cid not in lost:
            lost.add(cid)  # the first ack of this line never arrived
            return
        acked(cid, stored)

    eager._acked = lossy  # type: ignore[method-assign]
    queue, resent = eager._queue, 0

    def counting(data: bytes) -> None:  # resends go through _queue
        nonlocal resent
        resent += 1
        queue(data)

    eager._queue = counting  # type: ignore[method-assign]
    for i in range(5):
        await eager.send("general", f"once {i}", timeout=10)
    assert resent >= 5, "the lines were not resent"
    history = await eager.history("general", limit=100)
    assert texts(history) == ["raw once"] + [f"once {i}" for i in range(5)]


async def test_offline_client_gets_what_it_missed(connect, broker) -> None:
    talker = await connect("talker")
    await talker.join("general")
    away = await connect("away")
    await away.join("general")
    await talker.send("general", "before")
    assert texts(await chat(away, 1)) == ["before"]
    cursors = away.cursors()
    await away.close()
    for i in range(5):
        await talker.send("general", f"missed {i}")
    back = await connect("away", cursors=cursors)
    await back.join("general")
    assert texts(await chat(back, 5)) == [f"missed {i}" for i in range(5)]
    # beyond the bound: the client is told what it could not get
    cursors = back.cursors()
    await back.close()
    for i in range(8):
        await talker.send("general", f"later {i}")
    bounded = await connect("away", cursors=cursors, recover_limit=3)
    await bounded.join("general")
    from zchat.recovery import Gap

    events = await collect(bounded, 4, kinds=(p.Msg, Gap), where=lambda e: isinstance(e, Gap) or e.kind == "text")
    gap = events[0]
    assert isinstance(gap, Gap) and gap.last - gap.first + 1 == 5
    assert texts(events[1:]) == [f"later {i}" for i in range(5, 8)]


async def test_broker_restart_keeps_history_and_clients(connect, broker) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await bob.join("general")
    await alice.send("general", "before restart")
    await chat(bob, 1)
    await broker.stop()
    await wait_for(lambda: alice.state == "reconnecting", timeout=10, what="alice notices")
    pending = asyncio.create_task(alice.send("general", "sent while down"))
    await broker.start()
    await asyncio.wait_for(pending, 20)
    await wait_for(lambda: bob.state == "connected", timeout=10, what="bob reconnects")
    await alice.send("general", "after restart")
    got = await chat(bob, 2, timeout=15)
    assert texts(got) == ["sent while down", "after restart"]
    history = await bob.history("general")
    assert texts(history) == ["before restart", "sent while down", "after restart"]
    # seqs go on from the stored head: none reused, none skipped (a broker starting from
    # empty heads would number "sent while down" 1 again)
    assert [m.seq for m in history] == list(range(1, len(history) + 1))
    assert got[0].seq > max(m.seq for m in history if m.text == "before restart")


async def test_wall_clock_steps_limit_nobody_and_expire_nobody(connect, broker, monkeypatch) -> None:
    """Rate buckets and presence ran on the wall clock: a 1-hour step back kept a user
    limited for an hour, a 31 s step forward expired every session."""
    import time as time_module

    from zchat.broker import loop as broker_module  # the loop reads the wall clock
    from zchat.core import Limits

    await broker.stop()
    broker.limits = Limits(heartbeat=10.0, rate=20.0, burst=3)
    await broker.start()
    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await bob.join("general")
    real = time_module.time
    offset = [0.0]

    class SteppedTime:  # the broker's view of the time module: only the wall clock steps
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(time_module, name)

        @staticmethod
        def time() -> float:
            return real() + offset[0]

    core = broker.core
    ticks = [0]
    real_tick = core.tick

    def counted_tick(now, out):  # type: ignore[no-untyped-def]
        ticks[0] += 1
        real_tick(now, out)

    monkeypatch.setattr(core, "tick", counted_tick)
    monkeypatch.setattr(broker_module, "time", SteppedTime())
    before = len(core.sessions)
    offset[0] = 31.0  # forward, past the presence timeout (30 s)
    await wait_for(lambda: ticks[0] >= 3, what="three ticks after the step")
    assert len(core.sessions) == before  # nobody expired
    offset[0] = -3600.0  # an hour back: the bucket still refills
    for i in range(3):
        await alice.send("general", f"burst {i}")
    deadline = time_module.monotonic() + 5
    while True:  # after the burst, a line goes through within about 1/rate
        try:
            await alice.send("general", "after the step")
            break
        except Exception:
            assert time_module.monotonic() < deadline, "still limited after the wall clock stepped back"
            await asyncio.sleep(0.05)
    assert [m.text for m in await chat(bob, 4)][-1] == "after the step"


async def test_malformed_barrage_leaves_broker_serving(connect, broker) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await bob.join("general")
    await alice.send("general", "before barrage")
    await chat(bob, 1)
    ctx = zmq.asyncio.Context.instance()
    creds = (b"mallory", b"secret-of-mallory-0123456789")
    dealer, push, sub = ctx.socket(zmq.DEALER), ctx.socket(zmq.PUSH), ctx.socket(zmq.SUB)
    ports = broker.broker.ports
    dealer.routing_id = b"mallory-session"
    for sock, port in ((dealer, ports[0]), (push, ports[1]), (sub, ports[2])):
        sock.linger = 0
        sock.plain_username, sock.plain_password = creds
        sock.connect(f"tcp://127.0.0.1:{port}")
    garbage = [
        b"", b"\xc1", b"\xff" * 100, b"not msgpack at all", p.encode(p.Ping(rid=1))[:-2],
        b"\x83\xa1k\xa4ping\xa1v\x07\xa3rid\x01",  # unknown version
        b"\x83\xa1k\xa4join\xa1v\x01\xa3rid\xa1x",  # wrong type
        b"\x84\xa1k\xa4join\xa1v\x01\xa3rid\x01\xa4room\xa2\xc3\x28",  # invalid UTF-8
        b"\x82\xa1k\xa4nope\xa1v\x01",  # unknown kind
    ]
    for body in garbage:
        await dealer.send(body)
        await push.send(body)
    await dealer.send_multipart([b"two", b"frames"])
    await push.send_multipart([b"two", b"frames"])
    sub.subscribe(b"#" + b"x" * 20_000)
    sub.subscribe(b"\xff\xfe")
    replies = []
    for _ in range(len(garbage) + 1):
        assert await dealer.poll(5000), "no error reply for a malformed request"
        replies.append(p.decode_reply(await dealer.recv()))
    codes = {r.code for r in replies if isinstance(r, p.Error)}
    assert {p.ErrorCode.BAD_ENCODING, p.ErrorCode.BAD_VERSION, p.ErrorCode.BAD_REQUEST, p.ErrorCode.BAD_FRAME} <= codes
    # the rid of a bad request is echoed when it can be read; oversize requests are named
    await dealer.send(b"\x83\xa1k\xa4ping\xa1v\x07\xa3rid\x2a")
    await dealer.send(p.encode(p.Join(rid=43, room="x" * (70 * 1024))))
    echoed = [p.decode_reply(await dealer.recv()) for _ in range(2)]
    assert [(e.code, e.rid) for e in echoed] == [(p.ErrorCode.BAD_VERSION, 42), (p.ErrorCode.TOO_LARGE, 43)]
    # a malformed chat line from a real session gets its error back, with its cid
    await dealer.send(p.encode(p.Hello(rid=44)))
    assert isinstance(p.decode_reply(await dealer.recv()), p.Welcome)
    await push.send(b"\x85\xa1k\xa4send\xa1v\x01\xa3sid\xafmallory-session\xa3cid\xa2c1\xa4text\x05")
    assert await dealer.poll(5000)
    err = p.decode_reply(await dealer.recv())
    assert (err.code, err.cid) == (p.ErrorCode.BAD_REQUEST, "c1")
    # a session id no broker could have issued (not ASCII) is dropped, and breaks nothing
    await push.send(p.encode(p.Send(sid="€uro", cid="c2", text="hi", room="general")))
    await wait_for(lambda: broker.core.counters.get("bad_sid", 0) >= 1, what="bad sid counted")
    # an oversize chat line: MAXMSGSIZE makes libzmq drop the sender's connection
    await push.send(b"\x00" * (70 * 1024))
    await wait_for(lambda: broker.core.counters.get("bad_encoding", 0) >= 4, what="PULL garbage counted")
    for sock in (dealer, push, sub):
        sock.close()
    await alice.send("general", "after barrage")
    assert texts(await chat(bob, 1)) == ["after barrage"]
    assert texts(await bob.history("general")) == ["before barrage", "after barrage"]


async def test_broker_on_redis_storage(tmp_path: Path, redis_url: str) -> None:
    """The same broker on the Redis backend: chat, history, and a restart that keeps both."""
    import secrets

    from zchat.storage.redis import RedisStorage

    prefix = f"zchat-test-{secrets.token_hex(4)}:"
    running = await RunningBroker(tmp_path / "unused.db", Limits(heartbeat=HEARTBEAT), storage=lambda: RedisStorage(redis_url, prefix)).start()
    try:
        alice = Client(running.endpoint, "alice", "secret-of-alice-0123456789")
        bob = Client(running.endpoint, "bob", "secret-of-bob-0123456789")
        for c in (alice, bob):
            await c.connect()
            await c.join("general")
        await alice.send("general", "via redis")
        assert texts(await chat(bob, 1)) == ["via redis"]
        await running.stop()
        await running.start()
        await alice.send("general", "after restart", timeout=20)
        assert texts(await chat(bob, 1, timeout=20)) == ["after restart"]
        assert texts(await bob.history("general")) == ["via redis", "after restart"]
        thief = Client(running.endpoint, "alice", "another-secret-0123456789")
        with pytest.raises(AuthError):
            await thief.connect(timeout=5)
        for c in (alice, bob):
            await c.close()
    finally:
        await running.stop()


async def test_history_loss_is_reported_and_chat_goes_on(connect, broker, tmp_path: Path) -> None:
    """A broker that comes back with a new database (new epoch): clients are told, then carry on."""
    from zchat.recovery import Gap

    alice, bob = await connect("alice"), await connect("bob")
    await alice.join("general")
    await bob.join("general")
    await alice.send("general", "old world")
    await chat(bob, 1)
    await broker.stop()
    broker.path = tmp_path / "replacement.db"
    await broker.start()
    (gap,) = await collect(bob, 1, timeout=15, kinds=(Gap,))
    assert gap.room == "general" and "reset" in gap.reason
    await wait_for(lambda: alice.epoch == broker.core.epoch and alice.state == "connected", timeout=15, what="alice on the new epoch")
    await alice.send("general", "new world", timeout=15)
    got = await chat(bob, 1, timeout=15)
    assert [(m.text, m.epoch) for m in got] == [("new world", broker.core.epoch)]


async def test_dm_to_a_user_known_only_from_before_a_restart(connect, broker) -> None:
    quiet = await connect("quiet")  # claims the name, joins nothing
    await quiet.close()
    await broker.stop()
    await broker.start()
    alice = await connect("alice")
    stored = await alice.send_dm("quiet", "you there?")
    assert stored.room == "@alice:quiet"


async def test_catch_up_beyond_one_history_page(connect, broker) -> None:
    talker = await connect("talker")
    await talker.join("general")
    away = await connect("away")
    await away.join("general")
    cursors = away.cursors()
    await away.close()
    total = 1500  # more than one history page (MAX_HISTORY)
    for start in range(0, total, 250):
        await asyncio.gather(*(talker.send("general", f"n{i}") for i in range(start, start + 250)))
    back = await connect("away", cursors=cursors, recover_limit=5000)
    await back.join("general")
    got = await chat(back, total, timeout=30)
    assert sorted(int(m.text[1:]) for m in got) == list(range(total))
    assert [m.seq for m in got] == sorted(m.seq for m in got)


async def test_post_many_then_gather(connect) -> None:
    bulk = await connect("bulk")
    await bulk.join("general")
    stored = await asyncio.gather(*[bulk.post("general", f"p{i}") for i in range(300)])
    assert sorted(s.seq for s in stored) == list(range(2, 302))  # seq 1 is bulk's join line
    assert not bulk._pending


async def test_send_timeout_gives_up_and_forgets(connect, broker) -> None:
    alice = await connect("alice")
    await alice.join("general")
    await broker.stop()
    with pytest.raises(asyncio.TimeoutError):
        await alice.send("general", "into the void", timeout=0.2)
    assert not alice._pending  # no longer resent
    await broker.start()
    await wait_for(lambda: alice.state == "connected", timeout=15, what="reconnect")
    await alice.send("general", "back", timeout=15)
    # a timed-out send is unconfirmed, not cancelled: a copy queued in the socket may still land
    assert texts(await alice.history("general"))[-1] == "back"


async def test_a_renumbered_epoch_is_caught_up_within_the_recovery_limit(connect, broker, tmp_path: Path) -> None:
    """A store found open after the machine went down gets a new epoch but keeps its
    messages: a connected client starts that room afresh, so its catch-up is bounded
    like a return from being away (and says so), not a replay of all history."""
    import sqlite3

    from zchat.recovery import Gap

    alice = await connect("alice")
    bob = await connect("bob", recover_limit=20)
    await alice.join("general")
    await bob.join("general")
    for i in range(60):
        alice.post("general", f"line {i}")
    await alice.send("general", "line 60")
    await chat(bob, 61)
    old = broker.core.epoch
    await broker.stop()
    with sqlite3.connect(broker.path) as db:  # as if the machine had gone down with the file open
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('running', 'another-boot')")
    await broker.start()
    assert broker.core.epoch != old
    gaps = await collect(bob, 2, timeout=15, kinds=(Gap,))
    assert "reset" in gaps[0].reason and "recovery limit" in gaps[1].reason
    await alice.send("general", "after", timeout=15)
    got = await chat(bob, 21, timeout=15)
    assert [m.text for m in got][-1] == "after" and len({m.seq for m in got}) == 21
