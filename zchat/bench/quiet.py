"""``python -m zchat.bench.quiet``: the quiet path, measured long enough to profile.

The benchmark's latency scenario (one publisher at a fixed rate, N subscribers) for
chosen systems and seconds, with the server's CPU per line split by thread (the main
loop, libzmq's I/O thread, SQLite's checkpointer...) and, with ``--profile DIR``, py-spy
on the zchat broker over the run. Prints one line per system.

``--lockstep N``: zchat alone, N lines one at a time (each acked, then a pause of
``--gap`` seconds), so that every line is a wake-up of its own, as at a chat's usual
rate (the paced scenario's publisher sends in bursts on a loaded machine, so its
syscalls per line depend on how the lines happened to gather). One subscriber reads
the room; ``--strace`` and ``--profile`` apply to it too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    from zchat.bench import procs, scenarios
    from zchat.bench import profile as prof
    from zchat.bench.common import Sizes
    from zchat.bench.idle import thread_cpu

    parser = argparse.ArgumentParser(prog="python -m zchat.bench.quiet", description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=["zchat", "zmq-proxy", "py-forwarder"])
    parser.add_argument("--subs", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--profile", metavar="DIR", help="py-spy on the zchat broker during each run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--strace", metavar="PREFIX", help="count the zchat broker's syscalls (strace -c) into PREFIX-LABEL.txt")
    parser.add_argument("--lockstep", type=int, metavar="N", help="zchat only: N lines one at a time (see above)")
    parser.add_argument("--gap", type=float, default=0.002, help="--lockstep: seconds between an ack and the next line")
    args = parser.parse_args(argv)
    procs.raise_nofile()
    if args.lockstep:
        return lockstep(args)
    sizes = dataclasses.replace(Sizes.mode("quick"), latency_seconds=args.seconds, latency_rate=args.rate)
    workdir = scenarios.new_workdir()
    bench = scenarios.Bench(sizes, args.systems, lambda label: None, workdir)
    original = bench._traffic
    threads: dict[str, dict[str, float]] = {}

    def traffic(system: str, label: str, **kw: Any) -> dict:
        start_profile = prof.recorder(Path(args.profile), f"{label}-{system}", rate=250) if args.profile and system == "zchat" else None

        def on_go(pid: int) -> Any:
            before = thread_cpu(pid)
            stop = start_profile(pid) if start_profile else None
            tracer = None
            if args.strace and system == "zchat":  # syscalls by kind over the run, every thread
                import subprocess

                tracer = procs.popen(["strace", "-c", "-f", "-p", str(pid), "-o", f"{args.strace}-{label}.txt"], stderr=subprocess.DEVNULL)

            def done() -> None:
                threads[f"{system}/{label}"] = _split(pid, before, thread_cpu(pid))
                if stop:
                    stop()
                if tracer is not None:
                    import signal

                    tracer.send_signal(signal.SIGINT)
                    tracer.wait(20)

            return done

        kw["on_go"] = on_go
        return original(system, label, **kw)

    bench._traffic = traffic  # type: ignore[method-assign]
    rows = []
    try:
        for subs in args.subs:
            for system in args.systems:
                row = bench.latency(system, subs)
                rows.append(row)
                if "error" in row:
                    print(f"{system} {subs} subs: failed: {row['error'][:300]}")
                    continue
                sent = max(1, row["sent"])
                split = threads.get(f"{system}/latency{subs}", {})
                per = ", ".join(f"{name} {1e6 * cpu / sent:.0f}" for name, cpu in sorted(split.items(), key=lambda kv: -kv[1]))
                lat = row["latency_ms"]
                print(
                    f"{system} {subs} subs at {args.rate}/s: p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms; server CPU "
                    f"{row['cpu_us_per_msg']:.1f} us/line ({per}); publisher {row['pub_cpu_us_per_msg']:.1f} us/line",
                    flush=True,
                )
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.profile:
        for raw in sorted(Path(args.profile).glob("profile-*.txt")):
            summary = prof.summarize(raw, top=20)
            print(f"\n{raw.stem} ({summary['samples']} samples), self:")
            for func, share in summary["self"]:
                print(f"  {share:5.1f}%  {func}")
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], default=str))
    return 0


def _split(pid: int, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per thread name between two ``thread_cpu`` readings ("main" for the main thread)."""
    split: dict[str, float] = {}
    for key, cpu in after.items():
        name, tid = key.rsplit("/", 1)
        name = "main" if tid == str(pid) else name
        split[name] = split.get(name, 0.0) + cpu - before.get(key, 0.0)
    return {k: v for k, v in split.items() if v > 0}


def lockstep(args: argparse.Namespace) -> int:
    """Every line a wake-up of its own: the broker's CPU (by thread) per line."""
    import asyncio
    import signal
    import subprocess
    import time

    from zchat.bench import procs, scenarios, servers
    from zchat.bench import profile as prof
    from zchat.bench.common import ROOM, SECRET
    from zchat.bench.idle import thread_cpu
    from zchat.client import Client

    async def run(address: str, pid: int) -> dict[str, float]:
        pub, sub = Client(address, "p0", SECRET, label="bench"), Client(address, "s0", SECRET, label="bench")
        for client in (pub, sub):
            await client.connect(timeout=60)
            await client.join(ROOM)

        async def read() -> None:
            async for _ in sub.events():
                pass

        reader = asyncio.ensure_future(read())
        for i in range(200):  # warm up
            await pub.send(ROOM, f"warm-up {i}")
        hooks = []
        if args.strace:
            hooks.append(procs.popen(["strace", "-c", "-f", "-p", str(pid), "-o", f"{args.strace}-lockstep.txt"], stderr=subprocess.DEVNULL))
        stop_profile = prof.recorder(Path(args.profile), "lockstep-zchat", rate=250)(pid) if args.profile else None
        await asyncio.sleep(1.0)  # the tracers attach
        before, began = thread_cpu(pid), time.perf_counter()
        for i in range(args.lockstep):
            await pub.send(ROOM, f"line {i} of the lockstep run, about as long as a chat line")
            await asyncio.sleep(args.gap)
        after, elapsed = thread_cpu(pid), time.perf_counter() - began
        if stop_profile:
            stop_profile()
        for tracer in hooks:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(20)
        reader.cancel()
        await pub.close()
        await sub.close()
        split = _split(pid, before, after)
        split["elapsed"] = elapsed
        return split

    workdir = scenarios.new_workdir()
    try:
        server = servers.start_zchat(workdir, heartbeat=60)
        split = asyncio.run(run(server.endpoints["broker"], server.pid))
        elapsed = split.pop("elapsed")
        n = args.lockstep
        per = ", ".join(f"{name} {1e6 * cpu / n:.1f}" for name, cpu in sorted(split.items(), key=lambda kv: -kv[1]))
        print(f"zchat lockstep: {n} lines in {elapsed:.1f} s; server CPU {1e6 * sum(split.values()) / n:.1f} us/line ({per})", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.profile:
        raw = Path(args.profile) / "profile-lockstep-zchat.txt"
        if raw.exists():
            summary = prof.summarize(raw, top=20)
            print(f"\n{raw.stem} ({summary['samples']} samples), self:")
            for func, share in summary["self"]:
                print(f"  {share:5.1f}%  {func}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
