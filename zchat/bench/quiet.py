"""``python -m zchat.bench.quiet``: the quiet path, measured long enough to profile.

The benchmark's latency scenario (one publisher at a fixed rate, N subscribers) for
chosen systems and seconds, with the server's CPU per line split by thread (the main
loop, libzmq's I/O thread, SQLite's checkpointer...) and, with ``--profile DIR``, py-spy
on the zchat broker over the run. Prints one line per system.
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
    args = parser.parse_args(argv)
    procs.raise_nofile()
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
                after = thread_cpu(pid)
                split: dict[str, float] = {}
                for key, cpu in after.items():
                    name, tid = key.rsplit("/", 1)
                    name = "main" if tid == str(pid) else name
                    split[name] = split.get(name, 0.0) + cpu - before.get(key, 0.0)
                threads[f"{system}/{label}"] = {k: v for k, v in split.items() if v > 0}
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


if __name__ == "__main__":
    sys.exit(main())
