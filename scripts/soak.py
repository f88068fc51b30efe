#!/usr/bin/env python3
"""The soak: one broker, many clients chatting for a long time; not run in CI.

``python scripts/soak.py [--minutes 10] [--clients 200] [--rate 2] [--room-size 10]
[--readers 3] [--workers 4] [--json PATH]``

It starts ``zchat broker`` (a fresh SQLite file in a temporary directory), then
``--workers`` processes holding ``--clients`` chatting clients between them (each
posts ``--rate`` lines a second on average, Poisson, into its room of ``--room-size``)
and ``--readers`` reader processes that join every room and are paused (SIGSTOP) and
resumed (SIGCONT) on a schedule, some for longer than the broker's presence timeout.

Every minute it prints the broker's RSS and CPU, the lines acked, and the delivery
latency p50/p99 (send to arrival, as seen by every chatting client in the room) and
the ack latency p50/p99. At the end every reader must hold every acked line exactly
once: it prints the lines lost and doubled (both must be 0; the exit status is 1
otherwise) and RSS growth over the last 20 minutes (or the second half of a shorter
run). Figures, never assertions on time: it measures, the reader judges.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zchat import protocol as p  # noqa: E402
from zchat.client import Client, Gap, Recovered  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUCKET_MS = 0.1  # latency histograms in 0.1 ms buckets (merged exactly across processes)
PAUSES = [(60.0, 10.0), (90.0, 25.0), (120.0, 45.0)]  # per reader: (every, for) seconds


def out(obj: object) -> None:
    print(json.dumps(obj), flush=True)


def minute_of(t0: float) -> int:
    return int((time.time() - t0) // 60)


class Hist:
    """Per-minute latency histograms, flushed as JSON when the minute is over."""

    def __init__(self, t0: float, kind: str) -> None:
        self.t0, self.kind = t0, kind
        self.minute = minute_of(t0)
        self.counts: collections.Counter[int] = collections.Counter()

    def add(self, seconds: float) -> None:
        self.roll()
        self.counts[max(0, int(seconds * 1000 / BUCKET_MS))] += 1

    def roll(self, force: bool = False) -> None:
        now = minute_of(self.t0)
        if now != self.minute or force:
            out({"hist": self.kind, "minute": self.minute, "counts": self.counts})
            self.minute, self.counts = now, collections.Counter()


# ---------------------------------------------------------------- chatting clients


async def chatters(broker: str, first: int, count: int, rate: float, room_size: int, t0: float, seed: int) -> None:
    """``count`` clients (numbered from ``first``) chatting until SIGTERM, then settling."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    rng = random.Random(seed)
    deliveries, acks = Hist(t0, "delivery"), Hist(t0, "ack")
    acked: dict[str, list[int]] = collections.defaultdict(list)
    failed = [0]
    pending: set[asyncio.Future] = set()

    def on_events(name: str):  # type: ignore[no-untyped-def]
        def handle(events: list) -> None:
            if events and isinstance(events[-1], Recovered):
                return  # from history after a gap: not a live delivery
            now = time.time()
            for event in events:
                if isinstance(event, p.Msg) and event.kind == "text" and event.sender != name:
                    deliveries.add(now - float(event.text.split(" ", 1)[1]))
        return handle

    clients: list[Client] = []
    for i in range(first, first + count):
        name = f"c{i:04d}"
        client = Client(broker, name, f"secret-of-{name}-0123456789")
        await client.connect(timeout=30)
        await client.join(f"room{i // room_size:03d}")
        client.listen(on_events(name))
        clients.append(client)
    out({"ready": count})

    async def chat(client: Client, index: int) -> None:
        room = f"room{index // room_size:03d}"
        n = 0
        while not stop.is_set():
            await asyncio.sleep(rng.expovariate(rate))
            n += 1
            sent = time.time()
            fut = client.post(room, f"{n} {sent:.6f}")
            pending.add(fut)

            def done(f: asyncio.Future, name: str = client.name, n: int = n, sent: float = sent) -> None:
                pending.discard(f)
                if f.cancelled() or f.exception() is not None:
                    failed[0] += 1
                else:
                    acked[name].append(n)
                    acks.add(time.time() - sent)

            fut.add_done_callback(done)

    tasks = [asyncio.ensure_future(chat(c, first + k)) for k, c in enumerate(clients)]
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 5)
        except asyncio.TimeoutError:
            deliveries.roll()
            acks.roll()
    for task in tasks:
        task.cancel()
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # poll interval while the last sends settle
    deliveries.roll(force=True)
    acks.roll(force=True)
    out({"acked": acked, "failed": failed[0], "unsettled": len(pending)})
    for client in clients:
        await client.close()


# ---------------------------------------------------------------- readers


async def reader(broker: str, name: str, rooms: int, expect_path: str) -> None:
    """Joins every room; on SIGUSR1 checks what it holds against ``expect_path``."""
    report = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, report.set)
    seen: dict[str, set[int]] = collections.defaultdict(set)
    doubled = [0]
    gaps: list[list] = []
    recovered = [0]

    def handle(events: list) -> None:
        for event in events:
            if isinstance(event, p.Msg) and event.kind == "text":
                n = int(event.text.split(" ", 1)[0])
                got = seen[event.sender]
                if n in got:
                    doubled[0] += 1
                got.add(n)
            elif isinstance(event, Recovered):
                recovered[0] += event.count
            elif isinstance(event, Gap):
                gaps.append([event.room, event.first, event.last, event.reason])

    client = Client(broker, name, f"secret-of-{name}-0123456789", recover_limit=10**9)
    await client.connect(timeout=30)
    client.listen(handle)
    for r in range(rooms):
        await client.join(f"room{r:03d}")
    out({"ready": name})
    await report.wait()
    expect = {s: set(ns) for s, ns in json.loads(Path(expect_path).read_text()).items()}

    def missing() -> int:
        return sum(len(ns - seen.get(s, set())) for s, ns in expect.items())

    deadline = time.monotonic() + 180
    while missing() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # poll interval while it catches up
    unacked = sum(len(ns - expect.get(s, set())) for s, ns in seen.items())
    out({"report": name, "missing": missing(), "doubled": doubled[0], "gaps": gaps[:20], "gap_count": len(gaps),
         "recovered": recovered[0], "held": sum(len(v) for v in seen.values()), "unacked_held": unacked})
    await client.close()


# ---------------------------------------------------------------- the broker's figures


def proc_figures(pid: int) -> tuple[float, float]:
    """(RSS in MiB, CPU seconds used) of a process, from /proc."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def percentile(counts: collections.Counter[int], q: float) -> float:
    total = sum(counts.values())
    if not total:
        return float("nan")
    want, run = q * total, 0
    for bucket in sorted(counts):
        run += counts[bucket]
        if run >= want:
            return (bucket + 0.5) * BUCKET_MS
    return float("nan")


def free_base() -> int:
    for _ in range(200):
        base = random.randrange(20000, 32000)
        try:
            for port in range(base, base + 3):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports")


#: Longest line read from a worker: a chatter's final "acked" line lists every seq its
#: clients had acked (about 1 MB for 50 clients over 30 minutes; asyncio's default is 64 KiB).
LINE_LIMIT = 1 << 28
CHILDREN: list[asyncio.subprocess.Process] = []  # the broker and workers, stopped if the soak fails


async def pump_lines(proc: asyncio.subprocess.Process, sink: list[dict], tag: str) -> None:
    """Collect a worker's JSON lines. A failure here is loud: a worker whose pipe is not
    read blocks on its next write and the soak would hang."""
    assert proc.stdout is not None
    try:
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("{"):
                obj = json.loads(line)
                obj["_from"] = tag
                sink.append(obj)
            elif line:
                print(f"[{tag}] {line}", file=sys.stderr, flush=True)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        print(f"soak: reading {tag} failed: {exc!r}; stopping", file=sys.stderr, flush=True)
        for child in CHILDREN:
            if child.returncode is None:
                child.send_signal(signal.SIGCONT)
                child.terminate()
        os._exit(2)


async def orchestrate(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="zchat-soak-"))
    env = dict(os.environ, ZCHAT_CONFIG_DIR=str(tmp / "config"), ZCHAT_DATA_DIR=str(tmp / "data"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    base = free_base()
    endpoint = f"tcp://127.0.0.1:{base}"
    broker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zchat", "broker", "--bind", endpoint, "--db", str(tmp / "history.db"),
        "--max-per-address", "100000", "--claims-per-minute", "0", "--log-level", "WARNING",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, limit=LINE_LIMIT)
    CHILDREN.append(broker)
    lines: list[dict] = []
    pumps = [asyncio.ensure_future(pump_lines(broker, lines, "broker"))]
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", base + 2)) == 0:
                break
        await asyncio.sleep(0.05)  # poll interval while the broker binds
    rooms = (args.clients + args.room_size - 1) // args.room_size
    t0 = time.time()
    me = str(Path(__file__).resolve())
    workers, readers = [], []
    per = (args.clients + args.workers - 1) // args.workers
    for w in range(args.workers):
        first, count = w * per, min(per, args.clients - w * per)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, me, "_chatters", endpoint, str(first), str(count), str(args.rate), str(args.room_size),
            str(t0), str(args.seed + w), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, limit=LINE_LIMIT)
        workers.append(proc)
        CHILDREN.append(proc)
        pumps.append(asyncio.ensure_future(pump_lines(proc, lines, f"w{w}")))
    expect_path = tmp / "expect.json"
    for r in range(args.readers):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, me, "_reader", endpoint, f"reader{r}", str(rooms), str(expect_path),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, limit=LINE_LIMIT)
        readers.append(proc)
        CHILDREN.append(proc)
        pumps.append(asyncio.ensure_future(pump_lines(proc, lines, f"r{r}")))
    ready_needed = args.workers + args.readers
    while sum(1 for x in lines if "ready" in x) < ready_needed:
        await asyncio.sleep(0.1)  # poll interval while clients connect
    print(f"soak: {args.clients} clients in {rooms} rooms of {args.room_size}, {args.rate}/s each, "
          f"{args.readers} pausing readers, {args.minutes} min; ready after {time.time() - t0:.1f}s; broker pid {broker.pid}",
          flush=True)
    print(f"{'min':>3} {'rss_MiB':>8} {'cpu_%':>6} {'acked/s':>8} {'deliv_p50':>9} {'deliv_p99':>9} {'ack_p50':>8} {'ack_p99':>8}  paused",
          flush=True)
    samples: list[tuple[float, float, float]] = []  # (t, rss, cpu seconds)
    paused: dict[int, float] = {}  # reader index -> resume at (monotonic)
    next_pause = {r: time.monotonic() + PAUSES[r % len(PAUSES)][0] for r in range(args.readers)}
    end = t0 + args.minutes * 60
    printed = 0
    minute_rows: list[dict] = []
    last_cpu = (time.time(), proc_figures(broker.pid)[1])
    while time.time() < end:
        await asyncio.sleep(1.0)  # the sampling tick
        now_m = time.monotonic()
        for r, proc in enumerate(readers):
            every, length = PAUSES[r % len(PAUSES)]
            if r in paused and now_m >= paused[r]:
                proc.send_signal(signal.SIGCONT)
                del paused[r]
                next_pause[r] = now_m + every
            elif r not in paused and now_m >= next_pause[r]:
                proc.send_signal(signal.SIGSTOP)
                paused[r] = now_m + length
        rss, cpu = proc_figures(broker.pid)
        samples.append((time.time(), rss, cpu))
        current = minute_of(t0)
        if current > printed and time.time() - (t0 + current * 60) > 6:  # workers flushed minute `printed`
            row = minute_row(lines, printed, samples, last_cpu, len(paused))
            last_cpu = (time.time(), cpu)
            minute_rows.append(row)
            print_row(row)
            printed += 1
    for r in list(paused):
        readers[r].send_signal(signal.SIGCONT)
    for proc in workers:
        proc.send_signal(signal.SIGTERM)
    await asyncio.gather(*(proc.wait() for proc in workers))
    await asyncio.sleep(0.5)  # let the pumps read the workers' last lines (they exited)
    while printed <= minute_of(t0) and any(x.get("minute") == printed for x in lines if "hist" in x):
        row = minute_row(lines, printed, samples, last_cpu, 0)
        last_cpu = (time.time(), samples[-1][2])
        minute_rows.append(row)
        print_row(row)
        printed += 1
    acked: dict[str, list[int]] = {}
    failed = unsettled = 0
    for x in lines:
        if "acked" in x:
            acked.update(x["acked"])
            failed += x["failed"]
            unsettled += x["unsettled"]
    total = sum(len(v) for v in acked.values())
    expect_path.write_text(json.dumps(acked))
    for proc in readers:
        proc.send_signal(signal.SIGUSR1)
    await asyncio.gather(*(proc.wait() for proc in readers))
    await asyncio.sleep(0.5)  # the pumps' last lines
    reports = [x for x in lines if "report" in x]
    lost = sum(x["missing"] for x in reports) + (args.readers - len(reports)) * total
    doubled = sum(x["doubled"] for x in reports)
    broker.send_signal(signal.SIGTERM)
    await broker.wait()
    for task in pumps:
        task.cancel()
    summary = growth_summary(samples, t0)
    summary.update(clients=args.clients, rooms=rooms, rate=args.rate, minutes=args.minutes, readers=args.readers,
                   acked=total, failed=failed, unsettled=unsettled, lost=lost, doubled=doubled,
                   reports=[{k: v for k, v in x.items() if k != "_from"} for x in reports], per_minute=minute_rows)
    print(f"acked {total} lines ({failed} failed, {unsettled} unsettled at the end); "
          f"every reader holds them: lost {lost}, doubled {doubled}")
    for x in reports:
        print(f"  {x['report']}: missing {x['missing']}, doubled {x['doubled']}, gaps {x['gap_count']}, "
              f"recovered from history {x['recovered']}, held {x['held']}")
    print(f"broker RSS: {summary['rss_first']:.1f} MiB over the first 2 minutes (median), {summary['rss_last']:.1f} MiB at the end, "
          f"max {summary['rss_max']:.1f}; growth over {summary['window_min']:.0f} min window: {summary['rss_growth_pct']:+.2f}%")
    print(f"broker CPU: {summary['cpu_avg_pct']:.1f}% of one core on average")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if lost == 0 and doubled == 0 and len(reports) == args.readers else 1


def minute_row(lines: list[dict], minute: int, samples: list, last_cpu: tuple[float, float], paused: int) -> dict:
    hists: dict[str, collections.Counter[int]] = {"delivery": collections.Counter(), "ack": collections.Counter()}
    for x in lines:
        if "hist" in x and x["minute"] == minute:
            hists[x["hist"]].update({int(k): v for k, v in x["counts"].items()})
    now, cpu = time.time(), samples[-1][2]
    in_minute = [s for s in samples if s[0] <= now]
    return {"minute": minute, "rss_mib": round(in_minute[-1][1], 1),
            "cpu_pct": round(100 * (cpu - last_cpu[1]) / max(1e-9, now - last_cpu[0]), 1),
            "acked_per_s": round(sum(hists["ack"].values()) / 60, 1),
            "delivery_p50_ms": round(percentile(hists["delivery"], 0.5), 2), "delivery_p99_ms": round(percentile(hists["delivery"], 0.99), 2),
            "ack_p50_ms": round(percentile(hists["ack"], 0.5), 2), "ack_p99_ms": round(percentile(hists["ack"], 0.99), 2),
            "paused_readers": paused}


def print_row(r: dict) -> None:
    print(f"{r['minute']:>3} {r['rss_mib']:>8.1f} {r['cpu_pct']:>6.1f} {r['acked_per_s']:>8.1f} {r['delivery_p50_ms']:>9.2f} "
          f"{r['delivery_p99_ms']:>9.2f} {r['ack_p50_ms']:>8.2f} {r['ack_p99_ms']:>8.2f}  {r['paused_readers']}", flush=True)


def growth_summary(samples: list[tuple[float, float, float]], t0: float) -> dict:
    """RSS growth over the last 20 minutes (or the second half of a shorter run): the
    median of the window's first minute against the median of its last minute."""
    span = samples[-1][0] - samples[0][0]
    window = min(20 * 60, span / 2)
    start = samples[-1][0] - window
    head = [s[1] for s in samples if start <= s[0] < start + 60] or [samples[0][1]]
    tail = [s[1] for s in samples if s[0] >= samples[-1][0] - 60]
    first_minute = [s[1] for s in samples if s[0] < t0 + 120] or [samples[0][1]]
    a, b = statistics.median(head), statistics.median(tail)
    return {"rss_first": statistics.median(first_minute), "rss_last": b, "rss_max": max(s[1] for s in samples),
            "window_min": window / 60, "rss_window_start": a, "rss_growth_pct": 100 * (b - a) / a,
            "cpu_avg_pct": 100 * (samples[-1][2] - samples[0][2]) / max(1e-9, span),
            "rss_samples": [[round(s[0] - t0), round(s[1], 1)] for s in samples[::10]]}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_chatters":
        broker, first, count, rate, size, t0, seed = sys.argv[2:9]
        asyncio.run(chatters(broker, int(first), int(count), float(rate), int(size), float(t0), int(seed)))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_reader":
        broker, name, rooms, expect = sys.argv[2:6]
        asyncio.run(reader(broker, name, int(rooms), expect))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rate", type=float, default=2.0, help="lines a second per client (Poisson)")
    parser.add_argument("--room-size", type=int, default=10)
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="processes the chatting clients share")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    return asyncio.run(orchestrate(args))


if __name__ == "__main__":
    sys.exit(main())
