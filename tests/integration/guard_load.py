"""Idle TCP connections against a broker with few descriptors: CPU and lock-out figures.

Not a test (prints figures, asserts nothing). Starts ``zchat broker`` under a low
``ulimit -n``, opens idle TCP connections (no ZMTP) from loopback addresses, samples the
broker's CPU from /proc/PID/stat, then times a normal client's connect, join, send and
ping. Every address is on 127.0.0.0/8; everything is closed at the end.

    python tests/integration/guard_load.py [--fds 1024] [--conns 1098] [--addresses 1]
        [--window 5] [--extra "--max-per-address 64"]

Run it with PYTHONPATH pointing at the code to measure (e.g. /work/main for the code
before the guard; pass --extra "" there, as its broker has no guard flags).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    for base in range(24000, 32000, 7):
        try:
            for port in range(base, base + 3):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def thread_cpu(pid: int) -> dict[str, tuple[str, float]]:
    """tid -> (thread name, CPU seconds)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


async def client_works(endpoint: str, timeout: float) -> float | None:
    from zchat.client import Client

    start = time.monotonic()
    client = Client(endpoint, "alice", "secret-of-alice-0123456789")
    try:
        await client.connect(timeout=timeout)
        await client.join("general")
        await client.send("general", "hello")
        await client.ping()
        return time.monotonic() - start
    except Exception as exc:  # noqa: BLE001 - a figure, not a test
        print(f"  client failed: {type(exc).__name__}: {exc}")
        return None
    finally:
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fds", type=int, default=1024)
    ap.add_argument("--conns", type=int, default=1098)
    ap.add_argument("--addresses", type=int, default=1)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--extra", default="")
    args = ap.parse_args()
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="zchat-guard-load-"))
    env = dict(os.environ, ZCHAT_CONFIG_DIR=str(tmp / "cfg"), ZCHAT_DATA_DIR=str(tmp / "data"))
    cmd = [sys.executable, "-m", "zchat", "broker", "--bind", f"tcp://127.0.0.1:{port}", "--db", str(tmp / "h.db"),
           *shlex.split(args.extra)]
    log = (tmp / "broker.log").open("w")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.fds, args.fds))

    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port + 2)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("broker did not start:\n" + (tmp / "broker.log").read_text())
            time.sleep(0.02)  # polling interval
        idle = cpu_seconds(proc.pid)
        time.sleep(1.0)  # a measurement window
        print(f"fds {args.fds}, {args.conns} idle connections from {args.addresses} address(es), extra {args.extra!r}")
        print(f"  idle broker CPU: {100 * (cpu_seconds(proc.pid) - idle):.0f}% of a core")
        failed = 0
        for i in range(args.conns):
            s = socket.socket()
            s.bind((f"127.0.2.{1 + i % args.addresses}", 0))
            try:
                s.connect(("127.0.0.1", port + (i % 3)))
            except OSError:
                failed += 1
            socks.append(s)
        before, t0 = cpu_seconds(proc.pid), time.monotonic()
        threads = thread_cpu(proc.pid)
        time.sleep(args.window)  # a measurement window
        used = cpu_seconds(proc.pid) - before
        after = thread_cpu(proc.pid)
        busy = sorted(((after[t][1] - threads.get(t, (after[t][0], 0.0))[1], after[t][0]) for t in after), reverse=True)[:3]
        print("  busiest threads: " + ", ".join(f"{name} {sec:.2f}s" for sec, name in busy))
        print(f"  connect errors on the test side: {failed}")
        print(f"  broker CPU while they are held: {used:.2f}s over {time.monotonic() - t0:.1f}s = {100 * used / (time.monotonic() - t0):.0f}% of a core")
        took = asyncio.run(client_works(f"tcp://127.0.0.1:{port}", 10.0))
        print(f"  normal client connect+join+send+ping: {'FAILED within 10s' if took is None else f'{took * 1000:.0f} ms'}")
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        print(f"  broker descriptors in use: {fds} of {args.fds}")
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        lines = [ln for ln in (tmp / "broker.log").read_text().splitlines() if "descriptor" in ln or "cut" in ln or "edge" in ln]
        for ln in lines[:6]:
            print("  log:", ln[:200])


if __name__ == "__main__":
    main()
