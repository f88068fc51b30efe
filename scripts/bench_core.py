"""Micro-benchmark of the broker core's hot path and of paged requests; prints figures.

usage: python scripts/bench_core.py [lines]
"""

from __future__ import annotations

import sys
import time

from zchat import protocol as p
from zchat.core import Core, Limits, Outcome


def send_cost(lines: int, limits: Limits) -> float:
    """Microseconds per chat line through Core.send (one room, four senders, fresh cids)."""
    core = Core(epoch="E", boot="B", limits=limits, members={"dev": {f"u{i}" for i in range(4)}}, id_prefix="x-")
    for i in range(4):
        core.request(f"s{i}", f"u{i}", p.Hello(rid=1), 0.0, Outcome())
    msgs = [(f"u{i % 4}", p.Send(sid=f"s{i % 4}", cid=f"c{i}", text="hello there", room="dev")) for i in range(lines)]
    best = float("inf")
    for _ in range(3):
        core.dedup.__init__(*([limits.dedup_per_user, limits.dedup_total, limits.dedup_window] if hasattr(limits, "dedup_total") else []))
        for session in core.sessions.values():
            session.recent = None
        send = core.send
        t0 = time.perf_counter()
        for start in range(0, lines, 512):
            out = Outcome()
            now = float(start)
            for name, msg in msgs[start:start + 512]:
                send(name, msg, now, out)
        best = min(best, time.perf_counter() - t0)
    return best / lines * 1e6


def rooms_cost(rooms: int) -> float:
    """Milliseconds per `rooms` request (first page) with ``rooms`` public rooms."""
    core = Core(epoch="E", boot="B", members={f"r{i:06d}": {"alice"} for i in range(rooms)}, id_prefix="x-")
    core.request("s", "alice", p.Hello(rid=1), 0.0, Outcome())
    t0 = time.perf_counter()
    n = 20
    for i in range(n):
        core.request("s", "alice", p.Rooms(rid=i + 2), i * 10.0, Outcome())
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    send_cost(lines, Limits(rate=0))  # warm-up: the first run pays for growing the heap
    print(f"Core.send, rate limits off: {send_cost(lines, Limits(rate=0, **_off())):.2f} us/line")
    print(f"Core.send, default limits:  {send_cost(lines, Limits(rate=1e9, burst=1e9)):.2f} us/line")
    print(f"rooms request, 100k rooms:  {rooms_cost(100_000):.2f} ms")


def _off() -> dict:
    return {"room_rate": 0} if "room_rate" in Limits.__dataclass_fields__ else {}


if __name__ == "__main__":
    main()
