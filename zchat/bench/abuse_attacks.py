"""The abuse benchmark's attacks, the normal user and the database seeding.

Each attack is a function run in its own forked process against a fresh broker. It
gets an ``Env`` (endpoints, its deadline, a stop event) and a ``Saw`` to fill, and it
must be bounded: a count bound AND the deadline, and it must stop within about 0.1 s
of the stop event (the orchestrator sets it early when the broker's RSS passes the
safety cap). Every socket is linger=0; every connection goes to 127.0.0.1.

Names: the normal user is ``alice`` (it claims its name at its first handshake, as a
real user does). Attackers whose attack is not about names use names seeded into
storage beforehand (``atk-0`` ...), so that a per-address claim limit does not hide
the attack being measured; the name attacks (name-squatting, throwaway-names) claim
fresh names, because claiming is what they measure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import select
import socket
import time
from typing import Any, Callable

import zmq

from zchat import protocol as p
from zchat.bench.abuse_peers import SECRET, Peer, Saw, curve, digest

log = logging.getLogger(__name__)

NORMAL = "alice"
NORMAL_SECRET = "alice-abuse-secret-0123456789"
LOBBY = "lobby"  # the normal user's room
HELPERS = [f"atk-{i}" for i in range(16)]  # seeded names for attacks not about names
BIG_ROOM = "big"
BIG_LINES = 1000  # 60 KB lines seeded for unread-history: one limit=1000 page is ~60 MB today
BIG_TEXT = 60_000
BUSY = "busy"

mono = time.monotonic


@dataclasses.dataclass
class Env:
    """What an attack process is given."""

    router: str  # tcp://127.0.0.1:P
    pull: str
    pub: str
    deadline: float  # monotonic seconds; the attack ends by then
    stop: Any  # multiprocessing Event: end now
    server_key: bytes = b""  # the broker's public key (Z85): every peer speaks CURVE
    address: str = ""  # the keyed address (router#k=KEY) reference clients are given
    victim_sid: str = ""
    seconds: float = 10.0
    source: str = "127.0.0.1"  # the attacker's own loopback address (the normal user is 127.0.0.1)
    nice: int = 0  # the attack process's niceness (--attacker-nice): its CPU yields to the broker's
    idle: bool = False  # the attack process runs under SCHED_IDLE (--attacker-idle): only on CPU nobody else wants
    round: int = 0  # which round of a repeated attack this is (REPEATED): fresh names and cids each round

    def via(self, endpoint: str) -> str:
        """``endpoint`` connected from the attacker's source address (libzmq's
        ``tcp://SOURCE:0;HOST:PORT``), so per-address limits can tell it from the normal user."""
        if self.source == "127.0.0.1":
            return endpoint
        return endpoint.replace("tcp://", f"tcp://{self.source}:0;", 1)

    def over(self) -> bool:
        return self.stop.is_set() or mono() >= self.deadline

    def left(self) -> float:
        return max(0.0, self.deadline - mono())


# ------------------------------------------------------------------ seeding (before the broker starts)


def seed(db: str, attack: str) -> None:
    """Write what an attack needs into the fresh SQLite file: helper names, and for
    unread-history BIG_LINES lines of ~60 KB in BIG_ROOM (stored directly: storing them
    through a broker would take minutes under the rate limit, and is not the attack)."""
    from zchat.storage.sqlite import SqliteStorage

    async def run() -> None:
        store = SqliteStorage(db)
        await store.open()
        try:
            for name in HELPERS:
                await store.add_user(name, digest(name))
            if attack == "unread-history":
                await store.set_member(BIG_ROOM, HELPERS[0], True)
                text = "x" * BIG_TEXT
                now = time.time()
                batch = [
                    p.Msg(room=BIG_ROOM, seq=seq, id=f"seed-{seq:x}", ts=now, sender=HELPERS[0], text=text)
                    for seq in range(1, BIG_LINES + 1)
                ]
                for i in range(0, len(batch), 100):
                    await store.append(batch[i : i + 100])
        finally:
            await store.close()

    asyncio.run(run())


# ------------------------------------------------------------------ the normal user


def normal_user(router: str, ctl: Any, results: Any, timeout: float) -> None:
    """Send a line and read a 50-line history page every ~100 ms until ``ctl`` is set,
    recording (start time, op, seconds, ok); then check the stored history.

    Latencies are what the user waits for: ``send`` until the broker's ack, ``history``
    until the page arrived. A call that fails or takes over ``timeout`` is recorded as
    failed with the time it took.
    """
    from zchat.client import Client, ClientError

    async def main() -> None:
        client = Client(router, NORMAL, NORMAL_SECRET)
        await client.connect(timeout=10)
        await client.join(LOBBY)
        results.put(("ready", {"sid": client.sid}))
        samples: list[tuple[float, str, float, bool]] = []
        sent: list[tuple[str, bool]] = []  # (text, acked)
        errors: dict[str, int] = {}
        i = 0
        next_at = mono()
        while not ctl.is_set():
            text = f"normal line {i:06d}"
            i += 1
            t0 = mono()
            try:
                await client.send(LOBBY, text, timeout=timeout)
                ok = True
            except (ClientError, asyncio.TimeoutError) as exc:
                ok = False
                code = getattr(exc, "code", "timeout")
                errors[f"send:{code}"] = errors.get(f"send:{code}", 0) + 1
            t1 = mono()
            samples.append((t0, "send", t1 - t0, ok))
            sent.append((text, ok))
            try:
                await asyncio.wait_for(client.history(LOBBY, limit=50), timeout)
                ok = True
            except (ClientError, asyncio.TimeoutError) as exc:
                ok = False
                code = getattr(exc, "code", "timeout")
                errors[f"history:{code}"] = errors.get(f"history:{code}", 0) + 1
            t2 = mono()
            samples.append((t1, "history", t2 - t1, ok))
            next_at += 0.1
            wait = next_at - mono()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                next_at = mono()  # behind: do not catch up in a burst
        # After the attack: does this user's own session still work (within 10 s)?
        recovered = False
        deadline = mono() + 10
        while mono() < deadline:
            try:
                await client.ping(timeout=2)
                recovered = True
                break
            except (ClientError, asyncio.TimeoutError):
                await asyncio.sleep(0.2)
        await client.close()
        results.put(("done", {"samples": samples, "sent": sent, "errors": errors, "recovered": recovered}))

    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main())


def checker(router: str, results: Any) -> None:
    """After the attack, a fresh client (a seeded name, new session): wait (bounded)
    until the broker answers, then read the normal user's room back, every page."""
    from zchat.client import Client, ClientError

    async def main() -> dict[str, Any]:
        t0 = mono()
        client = Client(router, HELPERS[13], SECRET)
        answers = False
        error = ""
        stored: list[tuple[int, str]] = []
        deadline = mono() + 60
        while mono() < deadline and not answers:
            try:
                await client.connect(timeout=5)
                await client.ping(timeout=5)
                answers = True
            except (ClientError, asyncio.TimeoutError) as exc:
                error = f"no answer: {exc}"
                await client.close()
                client = Client(router, HELPERS[13], SECRET)
        if answers:
            error = ""
            after = 0
            end = mono() + 120
            while True:
                try:
                    page = await client.history(LOBBY, limit=p.MAX_HISTORY, after=after)
                except ClientError as exc:
                    if exc.code == p.ErrorCode.RATE_LIMITED and mono() < end:  # a request budget: wait, ask again
                        await asyncio.sleep(0.5)
                        continue
                    error = f"reading history back failed: {exc} [{exc.code}]"
                    break
                except asyncio.TimeoutError:
                    error = "reading history back failed: no answer within 10 s"
                    break
                if not page:
                    break
                stored += [(m.seq, m.text) for m in page if m.sender == NORMAL and m.kind == "text"]
                after = page[-1].seq
        await client.close()
        return {"answers": answers, "stored": stored, "error": error, "seconds": round(mono() - t0, 2)}

    logging.basicConfig(level=logging.ERROR)
    results.put(("checked", asyncio.run(main())))


def history_intact(sent: list[tuple[str, bool]], stored: list[tuple[int, str]]) -> tuple[bool, str]:
    """Whether the normal user's lines are in history as sent: every acked line exactly
    once, no line twice, and in the order they were sent. Returns (ok, why)."""
    order = {text: i for i, (text, _) in enumerate(sent)}
    seen: dict[str, int] = {}
    for _, text in stored:
        seen[text] = seen.get(text, 0) + 1
    twice = [t for t, n in seen.items() if n > 1]
    missing = [t for t, acked in sent if acked and t not in seen]
    strange = [t for t in seen if t not in order]
    positions = [order[t] for _, t in sorted(stored) if t in order]
    ordered = all(a < b for a, b in zip(positions, positions[1:]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} acked line(s) missing")
    if twice:
        problems.append(f"{len(twice)} line(s) stored twice")
    if strange:
        problems.append(f"{len(strange)} unknown line(s) under the user's name")
    if not ordered:
        problems.append("out of order")
    return (not problems, "; ".join(problems) or f"{len(stored)} lines, once each, in order")


# ------------------------------------------------------------------ helpers


def _helper(ctx: zmq.Context, env: Env, saw: Saw, i: int = 0, **kw: Any) -> Peer:
    """A seeded attacker name on a DEALER, with a session (hello answered)."""
    peer = Peer(ctx, zmq.DEALER, env.via(env.router), HELPERS[i], saw, server_key=env.server_key, **kw)
    if not peer.hello(timeout=min(5.0, max(1.0, env.left()))):
        saw.notes.setdefault("hello_failed", 0)
        saw.notes["hello_failed"] += 1
    return peer


class Rids:
    def __init__(self, start: int = 1000) -> None:
        self.n = start

    def __call__(self) -> int:
        self.n += 1
        return self.n


def _pipeline(peer: Peer, env: Env, bodies: Callable[[int], bytes | None], window: int, until: float | None = None) -> int:
    """Keep up to ``window`` requests in flight from ``bodies(i)`` (None: no more),
    reading replies; return how many were answered. Ends at the deadline / ``until``."""
    sent = answered = 0
    end = env.deadline if until is None else min(until, env.deadline)
    more = True
    while not env.stop.is_set() and mono() < end:
        while more and sent - answered < window:
            body = bodies(sent)
            if body is None:
                more = False
                break
            if not peer.send(body):
                break
            sent += 1
        if not more and answered >= sent:
            break
        if peer.sock.poll(20):
            answered += peer.drain(10_000)
        peer.events()
    return answered


# ------------------------------------------------------------------ the attacks


def unread_history(env: Env, saw: Saw) -> None:
    """History(limit=1000) of 60 KB lines, every 50 ms, replies never read."""
    ctx = zmq.Context()
    peer = _helper(ctx, env, saw, rcvhwm=1, rcvbuf=4096)
    rid = Rids()
    while not env.over() and saw.sent < 2000:
        peer.send(p.encode(p.History(rid=rid(), room=BIG_ROOM, limit=p.MAX_HISTORY)))
        env.stop.wait(0.05)
    saw.notes["history_requests"] = saw.sent - 1
    _peek(peer, saw, 1.0)
    peer.close()
    ctx.term()


def _peek(peer: Peer, saw: Saw, seconds: float) -> None:
    """After an unread flood, read what is queued for a moment: which replies/errors came."""
    end = mono() + seconds
    before = sum(saw.replies.values())
    while mono() < end:
        if peer.sock.poll(20):
            peer.drain(1000)
    peer.events()
    saw.notes["read_after_attack"] = sum(saw.replies.values()) - before


def unread_rooms(env: Env, saw: Saw) -> None:
    """Join up to 5,000 rooms, then ask ``rooms`` every 10 ms on a DEALER that never reads."""
    ctx = zmq.Context()
    joiner = _helper(ctx, env, saw)
    rid = Rids()
    joined_before = saw.replies["joined"]
    _pipeline(joiner, env, lambda i: p.encode(p.Join(rid=rid(), room=f"r-{i:05d}")) if i < 5000 else None, 256,
              until=mono() + 0.4 * env.left())
    saw.notes["rooms_joined"] = saw.replies["joined"] - joined_before
    reader = _helper(ctx, env, saw, rcvhwm=1, rcvbuf=4096)
    sent = 0
    while not env.over() and sent < 2000:
        if reader.send(p.encode(p.Rooms(rid=rid()))):
            sent += 1
        env.stop.wait(0.01)
    saw.notes["rooms_requests"] = sent
    _peek(reader, saw, 1.0)
    for peer in (joiner, reader):
        peer.close()
    ctx.term()


def stalled_subscriber_child(router: str, pub: str, server_key: bytes, results: Any) -> None:
    """The subscriber that gets SIGSTOPped: joins BUSY, subscribes, proves the
    subscription works, says ready, then just sleeps (the orchestrator stops it)."""
    ctx = zmq.Context()
    saw = Saw()
    dealer = Peer(ctx, zmq.DEALER, router, HELPERS[15], saw, server_key=server_key)
    ok = dealer.hello()
    joined = dealer.call(p.encode(p.Join(rid=2, room=BUSY)), 2, 5.0)
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    curve(sub, server_key, HELPERS[15])
    sub.connect(pub)
    topic = p.room_topic(BUSY)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    live = False
    deadline = mono() + 10
    n = 0
    while ok and joined and not live and mono() < deadline:
        n += 1
        dealer.send(p.encode(p.Send(sid=dealer.sid, cid=f"probe-{n}", text="probe", room=BUSY)))
        if sub.poll(200):
            live = True
        elif n % 5 == 0:  # the first subscribe may have raced the join: ask again
            sub.setsockopt(zmq.UNSUBSCRIBE, topic)
            sub.setsockopt(zmq.SUBSCRIBE, topic)
    results.put(("ready", {"subscribed": live}))
    while True:  # never reads again; SIGSTOP/SIGTERM from the orchestrator
        time.sleep(1)


def stalled_flood(env: Env, saw: Saw) -> None:
    """8 senders flood BUSY with 32 KB lines while its subscriber is stopped."""
    ctx = zmq.Context()
    peers = [_helper(ctx, env, saw, i) for i in range(8)]
    rid = Rids()
    for peer in peers:
        if env.over():
            break
        peer.call(p.encode(p.Join(rid=rid(), room=BUSY)), rid.n, min(5.0, max(0.1, env.left())))
    text = "y" * 32_000
    n = 0
    while not env.over() and n < 200_000:
        for peer in peers:
            n += 1
            peer.send(p.encode(p.Send(sid=peer.sid, cid=f"f{env.round}-{n:x}", text=text, room=BUSY)))
        for peer in peers:
            peer.drain(1000)
        if n % 64 == 0:
            env.stop.wait(0.001)
    saw.notes["lines_sent"] = saw.notes.get("lines_sent", 0) + n
    saw.notes["lines_stored"] = saw.stored
    for peer in peers:
        peer.close()
    ctx.term()


def _sized_send(sid: str, cid: str, room: str, size: int) -> bytes:
    """A valid Send body of exactly ``size`` bytes (padding the text)."""
    body = p.encode(p.Send(sid=sid, cid=cid, text="z", room=room))
    text = "z" * (1 + size - len(body))
    for _ in range(4):  # the text's length prefix may grow by a byte or two
        body = p.encode(p.Send(sid=sid, cid=cid, text=text, room=room))
        if len(body) == size:
            return body
        text = text[: len(text) - (len(body) - size)] if len(body) > size else text + "z" * (size - len(body))
    return body


def parked_queue(env: Env, saw: Saw) -> None:
    """Flood PULL and ROUTER with 64 KB frames (valid sends to a room it is in), as fast
    as the sockets take them, never reading the errors: up to 4 GiB in all."""
    ctx = zmq.Context()
    dealer = _helper(ctx, env, saw, rcvhwm=1, rcvbuf=4096)
    dealer.call(p.encode(p.Join(rid=2, room="spam")), 2, 5.0)
    push = Peer(ctx, zmq.PUSH, env.via(env.pull), HELPERS[0], saw, server_key=env.server_key)
    size = p.MAX_MESSAGE_BYTES
    mark = "pk-" + "X" * 12  # a fixed-width cid patched per frame: every line is new (no dedup shortcut)
    template = _sized_send(dealer.sid, mark, "spam", size)
    budget = 4 * 1024**3 // size
    sent = 0
    poller = zmq.Poller()
    poller.register(dealer.sock, zmq.POLLOUT)
    poller.register(push.sock, zmq.POLLOUT)
    frame = template.replace(mark.encode(), f"pk-{0:012x}".encode())
    while not env.over() and sent < budget:
        progress = False
        for sock in (dealer, push):
            if sock.send(frame):
                sent += 1
                progress = True
                frame = template.replace(mark.encode(), f"pk-{sent:012x}".encode())
        if not progress:
            poller.poll(10)
            dealer.events()
            push.events()
    saw.notes["frames_64k"] = sent
    saw.notes["mib_sent"] = round(sent * size / 2**20)
    _peek(dealer, saw, 0.5)
    dealer.close()
    push.close()
    ctx.term()


def heavy_frame_body() -> tuple[bytes, int]:
    """A ``sends`` frame with as many empty items ({}: one byte each) as fit in 64 KB."""
    head = b"\x83\xa1k\xa5sends\xa5items\xdd"  # map of 3; "k": "sends"; "items": array32
    tail = b"\xa1v\x01"
    n = p.MAX_MESSAGE_BYTES - len(head) - 4 - len(tail)
    return head + n.to_bytes(4, "big") + b"\x80" * n + tail, n


def heavy_frame(env: Env, saw: Saw) -> None:
    """``sends`` frames of ~65,500 empty items, on the DEALER and on PUSH, replies read."""
    ctx = zmq.Context()
    dealer = _helper(ctx, env, saw)
    push = Peer(ctx, zmq.PUSH, env.via(env.pull), HELPERS[0], saw, server_key=env.server_key, sndhwm=64)
    body, n = heavy_frame_body()
    saw.notes["items_per_frame"] = n
    sent = 0
    while not env.over() and sent < 20_000:
        outstanding = dealer.saw.sent - sum(saw.replies.values())
        if outstanding < 32:
            dealer.send(body)
            sent += 1
        if push.send(body):
            sent += 1
        if dealer.sock.poll(5):
            dealer.drain()
        dealer.events()
        push.events()
    saw.notes["frames"] = sent
    dealer.close()
    push.close()
    ctx.term()


def many_rooms(env: Env, saw: Saw) -> None:
    """Join as many rooms as it can (up to 20,000, in 60% of the time), then loop
    hello / rooms / bye, timing each: a Welcome lists every room of the user, a rooms
    reply every room, and hello/bye announce presence in every room."""
    ctx = zmq.Context()
    peer = _helper(ctx, env, saw)
    rid = Rids()
    before = saw.replies["joined"]
    _pipeline(peer, env, lambda i: p.encode(p.Join(rid=rid(), room=f"m-{i:05d}")) if i < 20_000 else None, 512,
              until=mono() + 0.6 * env.left())
    saw.notes["rooms_joined"] = saw.replies["joined"] - before
    times: dict[str, list[float]] = {"rooms": [], "hello": [], "bye": []}
    while not env.over():
        for op, body in (("hello", p.Hello), ("rooms", p.Rooms), ("bye", p.Bye)):
            r = rid()
            t0 = mono()
            reply = peer.call(p.encode(body(rid=r)), r, max(0.5, env.left()))
            if reply is not None:
                times[op].append(mono() - t0)
            if env.over():
                break
    for op, values in times.items():
        if values:
            saw.notes[f"{op}_ms_max"] = round(1000 * max(values), 1)
    saw.notes["cycles"] = len(times["bye"])
    peer.close()
    ctx.term()


def request_flood(env: Env, saw: Saw) -> None:
    """join/part loops and who/rooms/history floods, 256 in flight, replies read."""
    ctx = zmq.Context()
    peer = _helper(ctx, env, saw)
    rid = Rids()
    kinds = (
        lambda r: p.Join(rid=r, room="flood"), lambda r: p.Part(rid=r, room="flood"),
        lambda r: p.Who(rid=r, room=LOBBY), lambda r: p.Rooms(rid=r),
        lambda r: p.History(rid=r, room=LOBBY, limit=100), lambda r: p.Ping(rid=r),
    )
    t0 = mono()
    answered = _pipeline(peer, env, lambda i: p.encode(kinds[i % len(kinds)](rid())) if i < 2_000_000 else None, 256)
    elapsed = max(1e-9, mono() - t0)
    saw.notes["answered_per_s"] = round(answered / elapsed)
    saw.notes["join_part_lines"] = saw.replies["joined"] + saw.replies["ok"]
    peer.close()
    ctx.term()


def _claim_wave(ctx: zmq.Context, env: Env, saw: Saw, names: list[str], rid: Rids) -> list[Peer]:
    """Claim ``names`` as a client does (no hello): each asks on a look-only connection,
    then dials again; return the second connections whose handshake took the name."""
    asking = [Peer(ctx, zmq.DEALER, env.via(env.router), name, saw, server_key=env.server_key) for name in names]
    for peer in asking:
        peer.send(p.encode(p.Claim(rid=rid(), name=peer.name)))
    end = mono() + min(3.0, max(0.2, env.left()))
    oks: set[str] = set()
    while mono() < end and len(oks) < len(asking) and not env.stop.is_set():
        zmq.select([peer.sock for peer in asking], [], [], 0.02)
        for peer in asking:
            reply = peer.recv()
            if reply is not None and reply.get("k") == "ok":
                oks.add(peer.name)
    for peer in asking:
        peer.close()
    taking = [Peer(ctx, zmq.DEALER, env.via(env.router), name, saw, server_key=env.server_key) for name in names if name in oks]
    end = mono() + min(3.0, max(0.2, env.left()))
    while mono() < end and any(w.state == "connecting" for w in taking):
        zmq.select([w.mon for w in taking if w.state == "connecting"], [], [], 0.02)
        for w in taking:
            w.events()
    return [w for w in taking if w.state == "up"]


def name_squat(env: Env, saw: Saw) -> None:
    """Claim as many fresh names as possible: 64 claims at a time, up to 20,000."""
    ctx = zmq.Context()
    n = claimed = 0
    t0 = mono()
    tag = os.getpid() % 10_000
    rid = Rids()
    while not env.over() and n < 20_000:
        names = [f"sq{tag}-{n + i}" for i in range(64)]
        n += len(names)
        won = _claim_wave(ctx, env, saw, names, rid)
        claimed += len(won)
        for w in won:
            w.close()
    elapsed = max(1e-9, mono() - t0)
    saw.notes["names_tried"] = n
    saw.notes["names_claimed"] = claimed
    saw.notes["claims_per_s"] = round(claimed / elapsed)
    ctx.term()


def throwaway_names(env: Env, saw: Saw) -> None:
    """200 fresh names join the normal user's room; each sends up to 150 lines there."""
    ctx = zmq.Context()
    rid = Rids()
    peers: list[Peer] = []
    for i in range(0, 200, 50):
        if env.over():
            break
        peers += _claim_wave(ctx, env, saw, [f"tw{env.round}-{j:03d}" for j in range(i, i + 50)], rid)
    live: list[Peer] = []
    for peer in peers:
        if env.over():
            break
        if peer.hello(rid(), timeout=min(3.0, max(0.1, env.left()))):
            if peer.call(p.encode(p.Join(rid=rid(), room=LOBBY)), rid.n, min(3.0, max(0.1, env.left()))):
                live.append(peer)
    saw.notes["names_in_room"] = saw.notes.get("names_in_room", 0) + len(live)
    counts = {id(peer): 0 for peer in live}
    while not env.over() and any(c < 150 for c in counts.values()):
        for peer in live:
            if counts[id(peer)] < 150:
                counts[id(peer)] += 1
                peer.send(p.encode(p.Send(sid=peer.sid, cid=f"tw-{counts[id(peer)]}", text=f"spam {counts[id(peer)]}", room=LOBBY)))
        for peer in live:
            peer.drain(1000)
        env.stop.wait(0.001)
    end = mono() + 1.0
    while mono() < end and not env.stop.is_set():  # the last acks
        for peer in live:
            peer.drain(1000)
        env.stop.wait(0.02)
    saw.notes["lines_stored"] = saw.stored
    for peer in peers:
        peer.close()
    ctx.term()


def connection_flood(env: Env, saw: Saw) -> None:
    """Up to 2,000 idle TCP connections over the broker's three ports (non-blocking
    connects, 200 at a time, during at most half the time); then, once a second, a
    fresh client tries to connect and ping (locked out or not)."""
    from zchat.bench.procs import raise_nofile

    raise_nofile()
    ports = [int(e.rpartition(":")[2]) for e in (env.router, env.pull, env.pub)]
    conns: list[socket.socket] = []
    until = min(env.deadline, mono() + 0.5 * env.seconds)
    pending: dict[int, socket.socket] = {}
    poller = select.poll()
    opened = failed = 0
    while len(conns) + len(pending) < 2000 and not env.stop.is_set() and mono() < until:
        for _ in range(min(200, 2000 - len(conns) - len(pending))):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.bind((env.source, 0))
                s.connect_ex(("127.0.0.1", ports[(len(conns) + len(pending)) % 3]))
            except OSError:
                failed += 1
                s.close()
                continue
            pending[s.fileno()] = s
            poller.register(s.fileno(), select.POLLOUT)
        wave_end = min(until, mono() + 1.0)
        while pending and mono() < wave_end:
            for fd, _ in poller.poll(50):
                s = pending.pop(fd)
                poller.unregister(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    conns.append(s)
                    opened += 1
                else:
                    failed += 1
                    s.close()
        if pending and len(pending) >= 200:
            break  # a whole wave hangs in the backlog: the broker takes no more
    saw.notes["connections_opened"] = opened
    saw.notes["connect_failed"] = failed
    saw.notes["connect_pending"] = len(pending)
    probes: list[tuple[bool, float]] = []
    closed: set[int] = set()
    while not env.over():
        t0 = mono()
        ok = _probe(env.address)
        probes.append((ok, mono() - t0))
        _reap(conns, closed)
        env.stop.wait(max(0.0, 1.0 - (mono() - t0)))
    _reap(conns, closed)
    saw.notes["closed_by_broker"] = len(closed)
    saw.dropped += len(closed)
    saw.notes["new_client_ok"] = f"{sum(ok for ok, _ in probes)}/{len(probes)}"
    if probes:
        saw.notes["new_client_s_max"] = round(max(t for _, t in probes), 2)
    for s in conns + list(pending.values()):
        s.close()


def _reap(conns: list[socket.socket], closed: set[int]) -> None:
    """Read and drop what the broker sent (its ZMTP greeting); note closed connections.
    (poll, not select: these descriptors are above select's 1,024.)"""
    poller = select.poll()
    live = {s.fileno(): s for s in conns if s.fileno() not in closed}
    for fd in live:
        poller.register(fd, select.POLLIN)
    for fd, _ in poller.poll(0):
        try:
            if not live[fd].recv(4096):
                closed.add(fd)
        except BlockingIOError:
            pass
        except OSError:
            closed.add(fd)


def _probe(router: str) -> bool:
    """A fresh client of a seeded name: connect and ping within 3 s."""
    from zchat.client import Client, ClientError

    async def go() -> bool:
        client = Client(router, HELPERS[14], SECRET)
        try:
            await client.connect(timeout=3)
            await client.ping(timeout=3)
            return True
        except (ClientError, asyncio.TimeoutError, OSError):
            return False
        finally:
            await client.close()

    return asyncio.run(go())


def session_takeover(env: Env, saw: Saw) -> None:
    """A DEALER with the normal user's routing id under another name: hello, then a
    ping every 200 ms; every reply that is not an answer to its own rids is the victim's."""
    ctx = zmq.Context()
    peer = Peer(ctx, zmq.DEALER, env.via(env.router), HELPERS[1], saw, server_key=env.server_key, routing_id=env.victim_sid.encode("latin-1"))
    mine: set[int] = set()
    victims = 0
    victim_kinds: dict[str, int] = {}
    r = 900_000_000
    next_ping = mono()
    while not env.over():
        if mono() >= next_ping:
            r += 1
            mine.add(r)
            peer.send(p.encode(p.Hello(rid=r, client="takeover") if r == 900_000_001 else p.Ping(rid=r)))
            next_ping = mono() + 0.2
        if peer.sock.poll(20):
            while True:
                reply = peer.recv()
                if reply is None:
                    break
                if reply.get("rid") not in mine or reply.get("k") == "ack":
                    victims += 1
                    kind = str(reply.get("k"))
                    victim_kinds[kind] = victim_kinds.get(kind, 0) + 1
        peer.events()
    saw.notes["victim_replies_seen"] = victims
    if victim_kinds:
        saw.notes["victim_reply_kinds"] = victim_kinds
    peer.close()
    ctx.term()


ATTACKS: dict[str, Callable[[Env, Saw], None]] = {
    "unread-history": unread_history,
    "unread-rooms": unread_rooms,
    "stalled-subscriber": stalled_flood,
    "parked-queue": parked_queue,
    "heavy-frame": heavy_frame,
    "many-rooms": many_rooms,
    "request-flood": request_flood,
    "name-squatting": name_squat,
    "throwaway-names": throwaway_names,
    "connection-flood": connection_flood,
    "session-takeover": session_takeover,
}


#: Attacks whose own bounds end them before the deadline (8 senders cut and their
#: 200,000 frames spent; 150 lines from each name let in): they start again, with
#: fresh connections, names and cids, ROUND_GAP seconds after each round, up to
#: MAX_ROUNDS, so the normal user is measured under the attack for the whole time.
REPEATED = frozenset({"stalled-subscriber", "throwaway-names"})
ROUND_GAP = 0.5
MAX_ROUNDS = 100


def attacker(name: str, env: Env, results: Any) -> None:
    """Process entry: run one attack, then report what it saw (also after a crash)."""
    logging.basicConfig(level=logging.ERROR)
    if env.nice > 0:
        os.nice(env.nice)
    if env.idle:  # before any thread starts: libzmq's I/O threads inherit the policy
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    saw = Saw()
    try:
        rounds = 0
        while True:  # an attack that ends before its time comes back, as a hostile user would
            env.round = rounds
            ATTACKS[name](env, saw)
            rounds += 1
            if name not in REPEATED or rounds >= MAX_ROUNDS:
                break
            env.stop.wait(min(ROUND_GAP, env.left()))
            if env.over():
                break
        if name in REPEATED:
            saw.notes["rounds"] = rounds
    except Exception as exc:  # report it: a crashed attacker is a result, not a hang
        log.exception("attack %s failed", name)
        saw.notes["attacker_error"] = f"{type(exc).__name__}: {exc}"
    results.put(("saw", saw.as_dict()))
