"""What metrics and status cost the broker: the counters its loop keeps per busy turn,
a Prometheus scrape and a status reply with many rooms and sessions; prints figures.

usage: PYTHONPATH=. python scripts/bench_ops.py [rooms]
"""

from __future__ import annotations

import sys
import time
import timeit
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from zchat import protocol as p
from zchat.core import Core, Limits, Outcome
from zchat.guard import GuardConfig
from zchat.metrics import BrokerCollector, Stats, status


def per_turn() -> float:
    """Microseconds the loop's bookkeeping adds to one busy turn (what broker.py does)."""
    s = Stats()

    def turn() -> None:
        t = time.perf_counter()
        s.received += 3
        began = time.perf_counter()
        s.stored += 3
        s.append_seconds.observe(time.perf_counter() - began)
        s.replies += 0
        s.acks += 1
        s.publications += 1
        s.published += 3
        s.turn_seconds.observe(time.perf_counter() - t)
        s.turn_items = 2

    n = 300_000
    return (min(timeit.repeat(turn, number=n, repeat=5)) - min(timeit.repeat(lambda: None, number=n, repeat=5))) / n * 1e6


def big_broker(rooms: int) -> SimpleNamespace:
    members = {f"room{i}": {f"u{i % 5000}"} for i in range(rooms)}
    core = Core(epoch="E", boot="B", limits=Limits(), heads={r: 100 for r in members}, members=members)
    for i in range(5000):
        core.request(f"s{i}", f"u{i}", p.Hello(rid=1), 0.0, Outcome())
    stats = Stats()
    for code in p.ErrorCode.ALL:
        stats.error(code, True)
    return SimpleNamespace(core=core, stats=stats, storage=SimpleNamespace(path=Path(__file__)), guard=None,
                           guard_config=GuardConfig(), reserved=frozenset({"admin"}))


def main() -> None:
    rooms = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(f"loop bookkeeping: {per_turn():.2f} us per busy turn (a turn takes up to 128 lines a socket)")
    broker = big_broker(rooms)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker))  # type: ignore[arg-type]
    n = 20
    took = min(timeit.repeat(lambda: generate_latest(registry), number=n, repeat=3)) / n
    size = len(generate_latest(registry))
    print(f"scrape with {rooms:,} rooms, 5,000 sessions: {took * 1e3:.2f} ms in the HTTP thread, {size:,} bytes")
    body = broker.core.status(1)
    took = min(timeit.repeat(lambda: status(broker, broker.core.status(1)), number=n, repeat=3)) / n  # type: ignore[arg-type]
    print(f"status reply with {rooms:,} rooms: {took * 1e3:.2f} ms in the loop, {len(p.encode(body)):,} bytes")


if __name__ == "__main__":
    main()
