"""``python -m zchat.bench.idle``: what N connected, idle zchat clients cost the broker.

Starts a zchat broker (the benchmark's, ``servers.start``), makes every client a member
of one room (seeded, as in the scale scenario), connects N ``zchat.client.Client``s from
groups of at most 1,000 per process, lets them sit, and reads the broker's CPU from
``/proc/PID/stat`` over a window that spans whole heartbeats (pings are what idle
clients send). Prints one line and, with ``--json``, the figures. Nothing here times a
test: it is a measurement to read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from zchat.bench import procs, servers
from zchat.bench.common import SECRET


def _group(address: str, names: list[str], ready: Any, stop: Any) -> None:
    import asyncio

    import zmq.asyncio

    from zchat.client import Client

    procs.raise_nofile()

    async def run() -> None:
        zmq.asyncio.Context.instance().max_sockets = len(names) * 8 + 64
        clients = [Client(address, name, SECRET, label="idle") for name in names]
        for start in range(0, len(clients), 100):
            await asyncio.gather(*(c.connect(timeout=120) for c in clients[start : start + 100]))
        ready.put(len(clients))
        while not stop.is_set():
            await asyncio.sleep(0.2)

    asyncio.run(run())


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``, keyed "name/tid" (libzmq's I/O thread is ZMQbg/IO/0)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_bytes()
        except OSError:
            continue
        name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
        fields = stat.rsplit(b")", 1)[1].split()
        out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def split_threads(threads: dict[str, float], pid: int) -> dict[str, float]:
    """Per-thread CPU grouped as the docs' table reads it: the main loop (the thread whose
    id is the pid), libzmq's I/O thread, and the rest (the connection guard's thread: a
    Python thread shows as "python" before Python 3.14; libzmq's reaper)."""
    out = {"main loop": 0.0, "libzmq I/O": 0.0, "guard and other": 0.0}
    for key, pct in threads.items():
        name, _, tid = key.rpartition("/")
        group = "main loop" if tid == str(pid) else "libzmq I/O" if name.startswith("ZMQbg/IO") else "guard and other"
        out[group] = round(out[group] + pct, 3)
    return out


def measure(clients: int, heartbeat: float | None, seconds: float, workdir: Path, profile: Path | None = None) -> dict[str, Any]:
    """Broker CPU (% of a core) and RSS with ``clients`` idle clients connected."""
    from zchat.bench.scenarios import member_seed, split_groups
    from zchat.core import Limits

    hb = Limits().heartbeat if heartbeat is None else heartbeat
    groups = split_groups(clients, 1000)
    names = [[f"s{g}-{i}" for i in range(n)] for g, n in enumerate(groups)]
    server = servers.start("zchat", workdir, hb, seed=member_seed([n for group in names for n in group]))
    m = procs.mp()
    ready, stop = m.Queue(), m.Event()
    workers = []
    try:
        t0 = time.monotonic()
        for g, group in enumerate(names):
            workers.append(procs.spawn(_group, server.endpoints["broker"], group, ready, stop, name=f"idle{g}"))
        connected = 0
        for _ in groups:
            connected += ready.get(timeout=600)
        setup = time.monotonic() - t0
        # Pings started at connect times spread over the set-up (and jittered: each wait
        # 0.8-1.2 heartbeats): settle one heartbeat, then measure over whole heartbeats
        # (at least one, whatever --seconds says) so every client pinged about as often.
        time.sleep(hb)
        window = hb * max(1, math.ceil(seconds / hb))
        stop_profile = None
        if profile is not None:  # py-spy on the broker over the window (threads included)
            from zchat.bench import profile as prof

            stop_profile = prof.recorder(profile, f"idle{clients}", rate=200)(server.pid)
        t0s = thread_cpu(server.pid)
        c0, w0 = procs.cpu_seconds(server.pid), time.monotonic()
        time.sleep(window)
        c1, w1 = procs.cpu_seconds(server.pid), time.monotonic()
        t1s = thread_cpu(server.pid)
        threads = {k: round(100.0 * (v - t0s.get(k, 0.0)) / (w1 - w0), 3) for k, v in t1s.items() if v - t0s.get(k, 0.0) > 0}
        if stop_profile is not None:
            stop_profile()
        return {
            "clients": connected, "heartbeat_s": hb, "window_s": w1 - w0, "setup_s": setup,
            "broker_cpu_pct": 100.0 * (c1 - c0) / (w1 - w0), "broker_rss_mb": procs.rss_bytes(server.pid) / 2**20,
            "threads_cpu_pct": threads, "split_cpu_pct": split_threads(threads, server.pid),
        }
    finally:
        stop.set()
        for w in workers:
            w.join(10)
            procs.stop(w, grace=1.0)
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zchat.bench.idle", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--heartbeat", type=float, help="broker heartbeat in seconds [the default Limits]")
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window, rounded up to whole heartbeats [60]")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", metavar="DIR", help="sample the broker with py-spy over the window into DIR")
    args = parser.parse_args(argv)
    import shutil
    import tempfile

    procs.raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="zchat-idle-"))
    try:
        out = measure(args.clients, args.heartbeat, args.seconds, workdir, Path(args.profile) if args.profile else None)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{out['clients']:,} idle clients, heartbeat {out['heartbeat_s']:g} s: broker {out['broker_cpu_pct']:.2f}% of a core "
        f"over {out['window_s']:.0f} s, RSS {out['broker_rss_mb']:.0f} MB (set-up {out['setup_s']:.0f} s)"
    )
    print("  per thread: " + ", ".join(f"{group} {pct:.2f}%" for group, pct in out["split_cpu_pct"].items()))
    if args.json:
        print(json.dumps(out))
    if args.profile:
        from zchat.bench import profile as prof

        for raw in sorted(Path(args.profile).glob("profile-*.txt")):
            summary = prof.summarize(raw)
            print(f"{raw.name}: {summary['samples']} samples; self: " + ", ".join(f"{f} {s}%" for f, s in summary["self"][:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
