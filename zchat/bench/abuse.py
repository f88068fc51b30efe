"""The abuse benchmark: what one hostile client costs the broker and its normal users.

``python scripts/abuse.py`` (or ``zchat bench --abuse``). For each attack (and for an
"idle" row with no attack, the baseline) it starts a FRESH ``zchat broker`` subprocess
on free 127.0.0.1 ports with a new SQLite file in a temporary folder, connects a normal
user (zchat.client.Client, in its own process) that sends a line and reads a 50-line
history page every ~100 ms, then runs the attack (raw ZeroMQ peers, in their own
process) for ``--seconds``. It prints one table row per attack:

- the broker's RSS (VmRSS from /proc/PID/status, sampled every 100 ms) before the
  attack, at its peak, and after it;
- the normal user's send and history latencies (p50/p99) during the attack, and their
  p99 as a multiple of the idle row's;
- what the attacker saw: errors by code, refused handshakes, dropped connections;
- whether the normal user's lines are all in history once each, in order, and the
  broker is still alive.

Figures are measured, never asserted: the "targets" below only label a row, and the
exit status is 0 whenever the run itself worked (``--strict``: 1 if a target is missed).
Everything it starts is a child process, stopped by PID; a broker whose RSS passes
``--rss-cap`` has its attacker stopped early (the row says so).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import queue
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from zchat.bench import procs
from zchat.bench.abuse_attacks import ATTACKS, Env, attacker, checker, history_intact, normal_user, seed, stalled_subscriber_child

log = logging.getLogger(__name__)

IDLE = "idle"
NAMES = (IDLE, *ATTACKS)
WARMUP = 1.0  # seconds the normal user runs before the attack (not counted)
SETTLE = 1.0  # seconds after the attack before "after" is read and history checked
OP_TIMEOUT = 5.0  # the normal user gives up on one send or history call after this
FD_LIMIT = 1024  # RLIMIT_NOFILE (soft and hard) of the broker in the connection-flood row

#: What a row is held to. Placeholders until docs/reliability.md "Budgets and limits"
#: fixes them; they only label rows (and set the exit status with --strict).
TARGETS = {  # issue 12's: peak RSS under 512 MiB, the normal user's p99 within 5x idle
    "rss_peak_mib": 512.0,
    "p99_ratio": 5.0,
}

mono = time.monotonic


# ------------------------------------------------------------------ the broker


def _free_port_base(count: int = 3) -> int:
    """P..P+count-1 free on 127.0.0.1, below the ephemeral range (the connection flood
    uses thousands of ephemeral ports; a later broker must not collide with them)."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 32000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range on 127.0.0.1")


def _checkout() -> str:
    """The folder holding the zchat package this benchmark runs (the broker runs it too)."""
    import zchat

    return str(Path(zchat.__file__).resolve().parent.parent)


class BrokerProc:
    """``zchat broker`` (CURVE, its keypair made in the row's folder) as a subprocess of
    ours, stopped by PID. ``server_key`` and ``address`` are what peers and clients need."""

    def __init__(self, folder: Path, fd_limit: int | None = None, log_level: str = "WARNING") -> None:
        self.port = _free_port_base(4)
        self.router = f"tcp://127.0.0.1:{self.port}"
        self.pull = f"tcp://127.0.0.1:{self.port + 1}"
        self.pub = f"tcp://127.0.0.1:{self.port + 2}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZCHAT_")}
        env["ZCHAT_CONFIG_DIR"] = str(folder / "config")
        env["ZCHAT_DATA_DIR"] = str(folder / "data")
        env["PYTHONPATH"] = os.pathsep.join([_checkout(), *filter(None, [env.get("PYTHONPATH")])])
        cmd = [
            sys.executable, "-m", "zchat", "broker", "--bind", self.router, "--db", str(folder / "history.db"),
            "--log-level", log_level,
        ]

        def preexec() -> None:
            procs.die_with_parent()
            if fd_limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

        self.log = folder / "broker.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec)
        procs.wait_listening(self.port + 2, self.proc, timeout=60)
        from zchat import keys

        self.server_key = (folder / keys.KEY_FILE).read_text().split()[0].encode()  # made before the broker binds
        self.address = keys.keyed_address(self.router, self.server_key)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL after a grace); the exit status, None if it was killed."""
        was_alive = self.alive()
        procs.stop(self.proc, grace=10.0)
        return self.proc.returncode if was_alive else self.proc.returncode

    def log_problems(self) -> int:
        """Tracebacks and ERROR lines in the broker's log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return 0
        return sum(
            1 for line in text.splitlines()
            if "Traceback" in line or " ERROR " in line or line.startswith("ERROR")
        )


class Rss:
    """VmRSS of one process, sampled every 100 ms by whoever waits (see ``_wait``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.fds_max = 0  # open descriptors, the most seen (the connection flood's figure)
        self.next_at = 0.0

    def sample(self) -> int:
        now = mono()
        if now >= self.next_at:
            self.samples.append((now, procs.rss_bytes(self.pid)))
            self.fds_max = max(self.fds_max, procs.open_fds(self.pid))
            self.next_at = now + 0.1
        return self.samples[-1][1] if self.samples else 0

    def peak(self, since: float) -> int:
        return max((rss for t, rss in self.samples if t >= since), default=0)


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


# ------------------------------------------------------------------ one row


def _get(q: Any, rss: Rss, timeout: float, tag: str, give_up: Any = None) -> Any:
    """The next message ``tag`` from ``q`` within ``timeout`` s, sampling RSS meanwhile
    (TimeoutError at once when ``give_up()`` says it will never come)."""
    deadline = mono() + timeout
    while mono() < deadline:
        rss.sample()
        if give_up is not None and give_up():
            raise TimeoutError(f"no {tag!r}: gave up")
        try:
            got_tag, value = q.get(timeout=0.1)
        except queue.Empty:
            continue
        if got_tag == tag:
            return value
    raise TimeoutError(f"no {tag!r} within {timeout:.0f}s")


def attacker_source(wanted: str = "127.0.0.2") -> str:
    """The loopback address attackers connect from: ``wanted`` if this host lets us
    bind it (Linux routes all of 127/8 to lo), else 127.0.0.1 (then per-address limits
    cannot tell the attacker from the normal user, and the row says so)."""
    try:
        with socket.socket() as s:
            s.bind((wanted, 0))
        return wanted
    except OSError:
        return "127.0.0.1"


def run_row(
    name: str, seconds: float, folder: Path, rss_cap: int, source: str = "127.0.0.1", nice: int = 0, broker_log: str = "WARNING",
    idle: bool = False,
) -> dict[str, Any]:
    """One attack (or idle) against a fresh broker; the row's figures."""
    folder.mkdir(parents=True)
    seeder = procs.spawn(seed, str(folder / "history.db"), name, log=str(folder / "seed.log"), name="abuse-seed")
    seeder.join(120)
    procs.stop(seeder)
    broker = BrokerProc(folder, fd_limit=FD_LIMIT if name == "connection-flood" else None, log_level=broker_log)
    row: dict[str, Any] = {"attack": name, "seconds": seconds, "broker_pid": broker.pid, "attacker_source": source}
    rss = Rss(broker.pid)
    mp = procs.mp()
    ctl, stop = mp.Event(), mp.Event()
    normal_q, attack_q, sub_q = mp.Queue(), mp.Queue(), mp.Queue()
    user = attack = stalled = None
    try:
        user = procs.spawn(normal_user, broker.address, ctl, normal_q, OP_TIMEOUT, log=str(folder / "normal.log"), name="abuse-normal")
        ready = _get(normal_q, rss, 30, "ready")
        if name == "stalled-subscriber":
            via = Env(router="", pull="", pub="", deadline=0, stop=stop, source=source).via
            stalled = procs.spawn(stalled_subscriber_child, via(broker.router), via(broker.pub), broker.server_key, sub_q, log=str(folder / "stalled.log"), name="abuse-stalled")
            row["stalled_subscribed"] = _get(sub_q, rss, 30, "ready")["subscribed"]
            os.kill(stalled.pid, signal.SIGSTOP)
        end_warmup = mono() + WARMUP
        while mono() < end_warmup:  # a measurement window, not a wait for an event
            rss.sample()
            time.sleep(0.02)
        before = rss.sample()
        start = mono()
        cpu0 = procs.cpu_seconds(broker.pid)
        env = Env(router=broker.router, pull=broker.pull, pub=broker.pub, deadline=start + seconds, stop=stop,
                  victim_sid=ready["sid"], seconds=seconds, source=source, server_key=broker.server_key, address=broker.address,
                  nice=nice, idle=idle)
        if name != IDLE:
            attack = procs.spawn(attacker, name, env, attack_q, log=str(folder / "attacker.log"), name=f"abuse-{name}")
        end = start + seconds
        capped = False
        saw: dict[str, Any] | None = None
        while True:
            now = mono()
            current = rss.sample()
            if not capped and current > rss_cap:
                capped = True
                end = min(end, now)
                stop.set()
                row["rss_cap_hit"] = f"RSS {_mib(current):.0f} MiB > cap {_mib(rss_cap):.0f} MiB after {now - start:.1f}s: attacker stopped"
            if attack is None:
                if now >= end:
                    break
                time.sleep(0.02)
                continue
            try:
                tag, value = attack_q.get(timeout=0.05)
                if tag == "saw":
                    saw = value
                    break
            except queue.Empty:
                pass
            if now > start + seconds + 30:  # an attacker past its bound: stop it
                row["attacker_overran"] = True
                break
            if not attack.is_alive() and attack_q.empty():
                break
        end = min(end, mono(), start + seconds)
        row["attack_seconds"] = round(end - start, 2)
        row["broker_fds_max"] = rss.fds_max
        row["broker_cpu_pct"] = round(100 * (procs.cpu_seconds(broker.pid) - cpu0) / max(1e-9, mono() - start))
        procs.stop(attack)
        procs.stop(stalled)
        settle = mono() + SETTLE
        while mono() < settle:
            rss.sample()
            time.sleep(0.02)
        ctl.set()
        done = _get(normal_q, rss, 60, "done")
        check_q = mp.Queue()
        check = procs.spawn(checker, broker.address, check_q, log=str(folder / "checker.log"), name="abuse-checker")
        try:
            checked = _get(check_q, rss, 120, "checked", give_up=lambda: not broker.alive())
        except TimeoutError as exc:
            checked = {"answers": False, "stored": [], "error": f"broker not answering ({exc})", "seconds": float("nan")}
        finally:
            procs.stop(check)
        after = rss.sample()
        peak = rss.peak(start)
        alive = broker.alive() and checked["answers"]
        if checked["error"]:
            intact, why = False, checked["error"]
        else:
            intact, why = history_intact(done["sent"], checked["stored"])
        window = [s for s in done["samples"] if start <= s[0] <= end]
        row.update({
            "rss_mib": {"before": _mib(before), "peak": _mib(peak), "after": _mib(after)},
            "send_ms": _stats([s for s in window if s[1] == "send"]),
            "history_ms": _stats([s for s in window if s[1] == "history"]),
            # The slowest calls, with when they began (the broker's monotonic clock too:
            # with --broker-log DEBUG its slow-turn lines say what it was doing then).
            "slowest": [(round(t, 3), op, round(1e3 * took, 1)) for t, op, took, _ in sorted(window, key=lambda s: -s[2])[:5]],
            "normal_errors": done["errors"],
            "saw": saw or {},
            "alive": alive,
            "broker_process_alive": broker.alive(),
            "normal_recovered": done["recovered"],
            "check_seconds": checked["seconds"],
            "intact": intact,
            "intact_detail": why,
        })
    finally:
        procs.stop(attack)
        procs.stop(stalled)
        procs.stop(user)
        row["broker_exit"] = broker.stop()
        row["broker_log_problems"] = broker.log_problems()
    return row


def _stats(samples: list[tuple[float, str, float, bool]]) -> dict[str, Any]:
    """p50/p99/max in ms over the window's calls (a failed call counts with the time it took)."""
    values = sorted(1000 * s[2] for s in samples)
    failed = sum(1 for s in samples if not s[3])

    def pct(q: float) -> float:  # nearest rank: the smallest value with at least q of them at or below it
        if not values:
            return float("nan")
        return round(values[max(0, math.ceil(q * len(values)) - 1)], 2)

    return {"n": len(values), "failed": failed, "p50": pct(0.50), "p99": pct(0.99), "max": round(values[-1], 2) if values else float("nan")}


# ------------------------------------------------------------------ verdicts and the table


def limited(row: dict[str, Any]) -> str:
    """The "attacker limited?" cell: what the broker made the attacker see."""
    if row["attack"] == IDLE:
        return "-"
    saw = row.get("saw") or {}
    parts = [f"{code} {n:,}" for code, n in sorted((saw.get("errors") or {}).items(), key=lambda kv: -kv[1])]
    if saw.get("refused"):
        parts.append(f"{saw['refused']:,} handshakes refused")
    if saw.get("dropped"):
        parts.append(f"{saw['dropped']:,} connections dropped")
    notes = saw.get("notes") or {}
    if row["attack"] == "session-takeover":
        seen = notes.get("victim_replies_seen", 0)
        parts.append(f"saw {seen:,} of the victim's replies")
        verdict = "no" if seen else "yes"
    else:
        verdict = "yes" if parts else "no"
    return f"{verdict}: {', '.join(parts)}" if parts else verdict


def missed(row: dict[str, Any], idle: dict[str, Any] | None) -> list[str]:
    """Which targets this row misses (empty: all met)."""
    out = []
    if not row.get("broker_process_alive"):
        out.append("broker died")
    elif not row.get("alive"):
        out.append("broker stopped answering")
    if row.get("alive") and not row.get("normal_recovered"):
        out.append("normal user's session wedged")
    if not row.get("intact"):
        out.append("history not intact")
    rss = row.get("rss_mib")
    if rss and rss["peak"] > TARGETS["rss_peak_mib"]:
        out.append(f"RSS peak {rss['peak']:.0f} MiB")
    if row.get("rss_cap_hit"):
        out.append("RSS cap hit")
    for key, label in (("send_ms", "send"), ("history_ms", "history")):
        ratio = _ratio(row, idle, key)
        if ratio == ratio and ratio > TARGETS["p99_ratio"]:
            out.append(f"{label} p99 x{ratio:.0f}")
        if (row.get(key) or {}).get("failed"):
            out.append(f"{row[key]['failed']} {label}(s) failed")
        if key in row and not row[key].get("n"):
            out.append(f"no {label} call started in the window")
    notes = (row.get("saw") or {}).get("notes") or {}
    if notes.get("victim_replies_seen"):
        out.append("victim's replies leaked")
    ok = notes.get("new_client_ok")
    if ok and ok.split("/")[0] != ok.split("/")[1]:
        out.append(f"new clients locked out ({ok} connected)")
    return out


def _ratio(row: dict[str, Any], idle: dict[str, Any] | None, key: str) -> float:
    if not idle or row is idle:
        return 1.0 if row is idle else float("nan")
    a, b = (row.get(key) or {}).get("p99", float("nan")), (idle.get(key) or {}).get("p99", float("nan"))
    return a / b if b and b == b and a == a else float("nan")


def _f(x: float, spec: str = ".1f") -> str:
    return "?" if x != x else format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table, then one detail line per attack."""
    idle = next((r for r in rows if r["attack"] == IDLE and "send_ms" in r), None)
    lines = [
        "| attack | broker RSS MiB before / peak / after | send p50 / p99 ms | history p50 / p99 ms | p99 x idle (send / history) | attacker limited? | history intact | targets missed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['attack']} | run failed: {row['error']} | | | | | | |")
            continue
        rss, send, hist = row["rss_mib"], row["send_ms"], row["history_ms"]
        intact = ("yes" if row["intact"] else f"NO ({row['intact_detail']})")
        if not row["broker_process_alive"]:
            intact += ", broker DEAD"
        elif not row["alive"]:
            intact += ", broker not answering"
        miss = missed(row, idle)
        lines.append(
            f"| {row['attack']} | {rss['before']:.0f} / {rss['peak']:.0f} / {rss['after']:.0f} "
            f"| {_f(send['p50'])} / {_f(send['p99'])} | {_f(hist['p50'])} / {_f(hist['p99'])} "
            f"| {_f(_ratio(row, idle, 'send_ms'))} / {_f(_ratio(row, idle, 'history_ms'))} "
            f"| {limited(row)} | {intact} | {'; '.join(miss) if miss else 'none'} |"
        )
    lines.append("")
    lines.append("Details (what each attacker did and saw):")
    for row in rows:
        saw = row.get("saw") or {}
        bits = [f"{k}={v}" for k, v in (saw.get("notes") or {}).items()]
        if saw:
            bits.insert(0, f"frames sent={saw.get('sent', 0):,}")
            replies = saw.get("replies") or {}
            if replies:
                bits.append("replies=" + ",".join(f"{k}:{v}" for k, v in sorted(replies.items())))
        if "broker_cpu_pct" in row:
            bits.append(f"attack lasted {row['attack_seconds']:g} s, broker CPU {row['broker_cpu_pct']}%, broker fds max {row.get('broker_fds_max', '?')}")
        if row.get("send_ms"):
            bits.append(f"normal user calls in window={row['send_ms']['n']}+{row['history_ms']['n']}")
        for key in ("rss_cap_hit", "attacker_overran", "stalled_subscribed"):
            if key in row:
                bits.append(f"{key}={row[key]}")
        if row.get("normal_errors"):
            bits.append(f"normal user errors={row['normal_errors']}")
        if row.get("broker_log_problems"):
            bits.append(f"broker log error lines={row['broker_log_problems']}")
        if bits or row["attack"] != IDLE:
            lines.append(f"- {row['attack']}: " + "; ".join(bits))
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """JSON-ready: NaN (no figure) becomes null, tuples lists, other objects strings."""
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


# ------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="abuse",
        description="Run hostile clients against fresh zchat brokers and measure what they cost a normal user.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="attacks: " + ", ".join(NAMES) + "\n\nExamples:\n"
        "  python scripts/abuse.py --quick                     # every attack, 3 s each\n"
        "  python scripts/abuse.py --only heavy-frame,request-flood --json abuse.json\n"
        "  zchat bench --abuse --seconds 20",
    )
    parser.add_argument("--seconds", type=float, help="seconds each attack runs [10; 3 with --quick]")
    parser.add_argument("--quick", action="store_true", help="3 s per attack")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated attacks to run (idle, the baseline, always runs)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--rss-cap", type=float, default=3072, metavar="MIB", help="stop an attacker once the broker's RSS passes this [3072]")
    parser.add_argument("--attacker-source", default="127.0.0.2", metavar="ADDR",
                        help="loopback address the attackers connect from; the normal user uses 127.0.0.1 [127.0.0.2]")
    parser.add_argument("--attacker-nice", type=int, default=0, metavar="N", choices=range(0, 20),
                        help="run the attackers at niceness N (1-19): on one machine their own CPU (CURVE, "
                             "building frames flat out) otherwise competes with the broker and the normal user [0]")
    parser.add_argument("--attacker-idle", action="store_true",
                        help="run the attackers under SCHED_IDLE (Linux): they get only CPU nobody else wants, so on one "
                             "machine what the table shows is what the attack costs the broker, not the attackers' own "
                             "CPU taking the normal user's turns; they send as much as at nice 19")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (broker logs, databases)")
    parser.add_argument("--broker-log", default="WARNING", metavar="LEVEL", choices=("DEBUG", "INFO", "WARNING"),
                        help="the brokers' log level; DEBUG logs each slow loop turn and what it held [WARNING]")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any row misses a target")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 10.0
    if not 0 < args.seconds <= 600:
        parser.error("--seconds must be in (0, 600]")
    if not args.attacker_source.startswith("127."):
        parser.error("--attacker-source must be a loopback address (127.x.y.z)")
    names = list(NAMES)
    if args.only:
        wanted = [n.strip() for n in args.only.replace(" ", ",").split(",") if n.strip()]
        unknown = [n for n in wanted if n not in NAMES]
        if unknown:
            parser.error(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
        names = [IDLE] + [n for n in NAMES if n in wanted and n != IDLE]
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the rows, print the table (and write JSON); 0 when every row was measured."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="abuse: %(message)s")
    procs.raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="zchat-abuse-"))
    rows: list[dict[str, Any]] = []
    source = attacker_source(args.attacker_source)
    if source != args.attacker_source:
        print(f"cannot bind {args.attacker_source}: attackers connect from {source}, like the normal user", file=sys.stderr)
    started = datetime.datetime.now(datetime.timezone.utc)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        for i, name in enumerate(args.names, 1):
            print(f"[{i}/{len(args.names)}] {name} ({args.seconds:g} s) ...", file=sys.stderr, flush=True)
            try:
                rows.append(run_row(name, args.seconds, tmp / name, int(args.rss_cap * 2**20), source, args.attacker_nice, args.broker_log, args.attacker_idle))
            except Exception as exc:  # a row that could not be measured is said, not hidden
                log.exception("row %s failed", name)
                rows.append({"attack": name, "error": f"{type(exc).__name__}: {exc}"})
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    text = table(rows)
    print(text)
    idle = next((r for r in rows if r["attack"] == IDLE and "send_ms" in r), None)
    for row in rows:
        if "error" not in row:
            row["limited"] = limited(row)
            row["missed"] = missed(row, idle)
    if args.json:
        meta = {
            "started": started.isoformat(timespec="seconds"), "seconds": args.seconds,
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "targets": TARGETS, "rss_cap_mib": args.rss_cap, "fd_limit_connection_flood": FD_LIMIT,
            "attacker_source": source, "normal_source": "127.0.0.1", "attacker_nice": args.attacker_nice,
            "attacker_idle": args.attacker_idle,
        }
        Path(args.json).write_text(json.dumps(_plain({"meta": meta, "rows": rows}), indent=2))
    failed = [r for r in rows if "error" in r]
    if failed:
        return 2
    if args.strict and any(r.get("missed") for r in rows):
        return 1
    return 0
