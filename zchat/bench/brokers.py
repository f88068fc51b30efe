"""``zchat bench --brokers N``: one broker on SQLite, one on Redis, N on Redis, measured
the same way in one run.

For each setting: ingest (senders spread over the brokers post as fast as acks come
back), fan-out (``--subscribers`` clients spread over the brokers, a sender at
``--fanout-rate`` lines/s: deliveries/s and whether every one arrived), latency (one
subscriber per broker, a sender at ``--rate`` lines/s: p50/p99 from the send to the
delivery, the text carries the send time), and Redis CPU per message stored (the
server's user+system time from /proc over the ingest, divided by the lines).

Brokers are ``zchat broker`` processes (CURVE on, each its own key); Redis is a
redis-server of ours with ``appendonly yes`` and ``appendfsync`` as ``--fsync`` says
(``always`` by default, what the docs recommend). Clients run in forked workers (the
orchestrator holds none), so a client's decode does not share a process with a sender.
Figures print as a table and, with ``--out``, as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from zchat.bench import procs

ROOM = "bench"


# ------------------------------------------------------------------ servers


def _redis(tmp: Path, fsync: str) -> tuple[Any, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not installed")
    port = procs.free_port_base(1)
    d = tmp / "redis"
    d.mkdir()
    proc = procs.popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "yes", "--appendfsync", fsync,
         "--dir", str(d), "--logfile", str(d / "log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    procs.wait_listening(port, proc)
    return proc, f"redis://127.0.0.1:{port}/0"


def _brokers(tmp: Path, n: int, storage: str) -> tuple[list[Any], list[str]]:
    """``n`` broker processes on ``storage``; their procs and keyed addresses."""
    made, addresses = [], []
    for i in range(n):
        home = tmp / f"broker-{i}"
        home.mkdir()
        env = {**os.environ, "ZCHAT_DATA_DIR": str(home), "ZCHAT_CONFIG_DIR": str(home / "config")}
        flags = ["--storage", storage, "--rate", "0", "--request-rate", "0", "--max-per-address", "100000",
                 "--claims-per-minute", "0", "--heartbeat", "5", "--log-level", "WARNING"]
        for attempt in range(3):  # a port of the four may be taken between the look and the bind
            port = procs.free_port_base(4)
            base = [sys.executable, "-m", "zchat", "broker", "--bind", f"tcp://127.0.0.1:{port}", "--db", str(home / "history.db")]
            shown = subprocess.run([*base, "--show-address"], env=env, capture_output=True, text=True, timeout=60, check=True)
            with open(home / "broker.log", "w") as log:  # the child holds its own copy of the descriptor
                proc = procs.popen([*base, *flags], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                procs.wait_listening(port + 2, proc)
                break
            except RuntimeError:
                procs.stop(proc)
                if attempt == 2:
                    raise RuntimeError(f"broker {i} did not start: {(home / 'broker.log').read_text()[-1500:]}") from None
        addresses.append(shown.stdout.split()[0])
        made.append(proc)
    return made, addresses


# ------------------------------------------------------------------ clients (in workers)


async def _clients(addresses: list[str], names: list[str], cfg: str) -> list[Any]:
    from zchat.client import Client

    os.environ["ZCHAT_CONFIG_DIR"] = cfg
    out = []
    for i, name in enumerate(names):
        client = Client(addresses[i % len(addresses)], name, f"secret-of-{name}-0123456789", trust_new_broker=True,
                        sub_hwm=1_000_000, recover_limit=1_000_000)
        await client.connect(timeout=30)
        await client.join(ROOM)
        out.append(client)
    return out


def _subscribe_worker(addresses: list[str], names: list[str], cfg: str, expect: int, deadline: float, conn: Any) -> None:
    """Clients that count the bench lines they get and time them from their send stamp."""

    async def run() -> None:
        from zchat import protocol as p

        clients = await _clients(addresses, names, cfg)
        counts = [0] * len(clients)
        lat: list[float] = []
        done = asyncio.Event()

        def on(i: int):  # type: ignore[no-untyped-def]
            def handle(events: list) -> None:
                now = time.time()
                for e in events:
                    if isinstance(e, p.Msg) and e.kind == "text" and e.text.startswith("t"):
                        counts[i] += 1
                        lat.append(now - float(e.text[1:].split(" ")[0]))
                if all(c >= expect for c in counts):
                    done.set()
            return handle

        for i, c in enumerate(clients):
            c.listen(on(i))
        conn.send("ready")
        try:
            await asyncio.wait_for(done.wait(), deadline)
        except TimeoutError:
            pass
        conn.send({"counts": counts, "lat": lat})
        for c in clients:
            await c.close()

    asyncio.run(run())


def _send_worker(addresses: list[str], names: list[str], cfg: str, total: int, rate: float, conn: Any) -> None:
    """Senders: ``total`` lines over them, as fast as acks allow (rate 0) or paced."""

    async def run() -> None:
        clients = await _clients(addresses, names, cfg)
        conn.send("ready")
        conn.recv()  # go
        began = time.perf_counter()
        futures = []
        for i in range(total):
            if rate > 0:
                due = began + i / rate
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            futures.append(clients[i % len(clients)].post(ROOM, f"t{time.time():.6f} {i}"))
            if rate <= 0 and i % 256 == 255:
                await asyncio.sleep(0)  # let the batch go
        await asyncio.wait_for(asyncio.gather(*futures), 300)
        conn.send({"seconds": time.perf_counter() - began})
        for c in clients:
            await c.close()

    asyncio.run(run())


def _pipe() -> tuple[Any, Any]:
    return procs.mp().Pipe()


def _spawn(target: Any, *args: Any) -> tuple[Any, Any]:
    ours, theirs = _pipe()
    return procs.spawn(target, *args, theirs), ours


def _await(conn: Any, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"a bench worker said nothing within {timeout:.0f}s")
    return conn.recv()


# ------------------------------------------------------------------ one setting


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_setting(label: str, n: int, storage: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``n`` brokers on ``storage`` (a fresh Redis of ours for "redis") and measure."""
    redis_proc = None
    row: dict[str, Any] = {"setting": label, "brokers": n}
    try:
        if storage == "redis":
            redis_proc, url = _redis(tmp, args.fsync)
            storage = url
        brokers, addresses = _brokers(tmp, n, storage)
        cfg = str(tmp / "clients")
        # ingest
        senders, conn = _spawn(_send_worker, addresses, [f"s{i}" for i in range(max(4, n))], cfg, args.messages, 0.0)
        assert _await(conn, 120) == "ready"
        cpu0 = procs.cpu_seconds(redis_proc.pid) if redis_proc else 0.0
        conn.send("go")
        took = _await(conn, 300)["seconds"]
        redis_cpu = (procs.cpu_seconds(redis_proc.pid) - cpu0) if redis_proc else 0.0
        procs.stop(senders)
        row["ingest_msgs_s"] = args.messages / took
        row["redis_us_per_msg"] = redis_cpu / args.messages * 1e6 if redis_proc else None
        # fan-out, then latency: subscribers first, then a paced sender
        for kind, subs, rate, count in (
            ("fanout", args.subscribers, args.fanout_rate, int(args.fanout_rate * args.seconds)),
            ("latency", max(n, 3), args.rate, int(args.rate * args.seconds)),
        ):
            workers = []
            per = max(1, subs // args.workers)
            names = [f"{kind}{i}" for i in range(subs)]
            for w in range(0, subs, per):
                proc, c = _spawn(_subscribe_worker, addresses, names[w:w + per], cfg, count, args.seconds * 4 + 30)
                workers.append((proc, c))
            for _, c in workers:
                assert _await(c, 180) == "ready"
            sender, sc = _spawn(_send_worker, addresses, [f"{kind}-sender"], cfg, count, rate)
            assert _await(sc, 60) == "ready"
            began = time.perf_counter()
            sc.send("go")
            _await(sc, args.seconds * 4 + 60)
            results = [_await(c, args.seconds * 4 + 60) for _, c in workers]
            took = time.perf_counter() - began
            for proc, _ in workers + [(sender, sc)]:
                procs.stop(proc)
            counts = [x for r in results for x in r["counts"]]
            lat = [x for r in results for x in r["lat"]]
            if kind == "fanout":
                row["fanout_subscribers"] = subs
                row["fanout_rate"] = rate
                row["fanout_deliveries_s"] = sum(counts) / took
                row["fanout_complete"] = sum(counts) == count * subs
            else:
                row["latency_rate"] = rate
                row["latency_p50_ms"] = _percentile(lat, 0.5) * 1000
                row["latency_p99_ms"] = _percentile(lat, 0.99) * 1000
                row["latency_complete"] = sum(counts) == count * len(counts)
        for proc in brokers:
            procs.stop(proc)
    except Exception as exc:  # one setting failing must not hide the others
        row["error"] = repr(exc)
    finally:
        procs.stop_all()
        if redis_proc is not None:
            procs.stop(redis_proc)
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("setting", "setting", "{}"), ("ingest_msgs_s", "ingest msgs/s", "{:,.0f}"),
        ("fanout_deliveries_s", "fan-out deliveries/s", "{:,.0f}"), ("fanout_complete", "all delivered", "{}"),
        ("latency_p50_ms", "p50 ms", "{:.1f}"), ("latency_p99_ms", "p99 ms", "{:.1f}"),
        ("redis_us_per_msg", "Redis CPU us/msg", "{:.1f}"),
    ]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['setting']} | error: {row['error']} |")
            continue
        cells = ["-" if row.get(k) is None else f.format(row[k]) for k, _, f in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="zchat bench --brokers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--brokers", type=int, default=3, help="brokers of the last setting (on one Redis)")
    ap.add_argument("--messages", type=int, default=5000, help="lines of the ingest run")
    ap.add_argument("--subscribers", type=int, default=100, help="fan-out subscribers, spread over the brokers")
    ap.add_argument("--fanout-rate", type=float, default=100.0, help="lines/s of the fan-out run")
    ap.add_argument("--rate", type=float, default=2000.0, help="lines/s of the latency run")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of the fan-out and latency runs")
    ap.add_argument("--workers", type=int, default=2, help="processes the subscribers are spread over")
    ap.add_argument("--fsync", choices=["always", "everysec"], default="always", help="Redis appendfsync")
    ap.add_argument("--out", help="write the rows as JSON here too")
    args = ap.parse_args(argv)
    procs.raise_nofile()
    rows = []
    for label, n, storage in (("1 broker, SQLite", 1, "sqlite"), ("1 broker, Redis", 1, "redis"),
                              (f"{args.brokers} brokers, Redis", args.brokers, "redis")):
        tmp = Path(tempfile.mkdtemp(prefix="zchat-bench-brokers-"))
        print(f"running: {label} ...", flush=True)
        rows.append(run_setting(label, n, storage, tmp, args))
        shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(rows[-1]), flush=True)
    print(_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0 if not any("error" in r for r in rows) else 1
