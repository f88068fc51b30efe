"""Micro-benchmark of the broker core: Core.send per line, and a `rooms` request with
many rooms; prints figures (compare with another checkout: PYTHONPATH=that/checkout).

usage: python scripts/bench_core.py [lines]
"""

from __future__ import annotations

import sys
import time

from zchat import protocol as p
from zchat.core import Core, Limits, Outcome

FIELDS = Limits.__dataclass_fields__


def limits(**kwargs: float) -> Limits:
    """Limits with the fields this checkout knows of."""
    return Limits(**{k: v for k, v in kwargs.items() if k in FIELDS})


def send_cost(lines: int, lim: Limits, reps: int = 3) -> float:
    """Best microseconds per chat line through Core.send: one room, four senders, fresh
    cids, 512 lines a turn, one turn per simulated second."""
    core = Core(epoch="E", boot="B", limits=lim, members={"dev": {f"u{i}" for i in range(4)}}, id_prefix="x-")
    for i in range(4):
        core.request(f"s{i}", f"u{i}", p.Hello(rid=1), 0.0, Outcome())
    msgs = [(f"u{i % 4}", p.Send(sid=f"s{i % 4}", cid=f"c{i}", text="hello there", room="dev")) for i in range(lines)]
    best = float("inf")
    clock = 0.0
    for _ in range(reps):
        core.dedup.by_user.clear()  # fresh cids again
        for session in core.sessions.values():
            session.recent = None
        send = core.send
        t0 = time.perf_counter()
        for start in range(0, lines, 512):
            out = Outcome()
            clock += 1.0
            for name, msg in msgs[start:start + 512]:
                send(name, msg, clock, out)
        best = min(best, time.perf_counter() - t0)
        assert not out.replies, out.replies[:1]  # nothing refused: every line was taken
    return best / lines * 1e6


def rooms_cost(rooms: int) -> float:
    """Milliseconds per `rooms` request (the first page) with ``rooms`` public rooms."""
    core = Core(epoch="E", boot="B", members={f"r{i:06d}": {"alice"} for i in range(rooms)}, id_prefix="x-")
    core.request("s", "alice", p.Hello(rid=1), 0.0, Outcome())
    n = 20
    t0 = time.perf_counter()
    for i in range(n):
        core.request("s", "alice", p.Rooms(rid=i + 2), i * 10.0, Outcome())
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    off = limits(rate=0, room_rate=0)
    on = limits(rate=1e9, burst=1e9, room_rate=1e9, room_burst=1e9)  # every bucket taken, none refuses
    send_cost(lines, off, 1)  # warm-up: the first run pays for growing the heap
    print(f"Core.send, no rate limits:        {send_cost(lines, off):.2f} us/line")
    print(f"Core.send, user and room buckets: {send_cost(lines, on):.2f} us/line")
    print(f"rooms request, 100,000 rooms:     {rooms_cost(100_000):.2f} ms")


if __name__ == "__main__":
    main()
