"""``python scripts/bench.py`` / ``zchat bench``: zchat against its peers, in one run.

Peers: libzmq's forwarder (``zmq.proxy(PULL, PUB)``), a naive Python forwarder, Redis
pub/sub (redis-py + hiredis against our own ``redis-server`` on loopback) and the classic
thread-per-client chat. Every system gets a fresh server process per run; publishers
and subscribers are separate processes. Results: a markdown table (printed and written),
a JSON file and PNG plots (when matplotlib is importable) in the results folder.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

SCENARIOS = ("ingest", "fanout", "latency", "loss", "stall", "scale", "chat", "history")


class Progress:
    """A plain-text progress bar on stderr (one line per step when stderr is not a terminal)."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total = max(1, total)
        self.done = 0
        self.started = time.monotonic()
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * (self.done - 1) / self.total)
        elapsed = time.monotonic() - self.started
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done:>2}/{self.total} {elapsed:5.0f}s  {label}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        elapsed = time.monotonic() - self.started
        line = f"[{'#' * 30}] {self.total}/{self.total} {elapsed:5.0f}s  done"
        self.stream.write(("\r\033[K" if self.tty else "") + line + "\n")
        self.stream.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench",
        description="Benchmark zchat against libzmq's proxy, a Python forwarder, Redis pub/sub and a threaded chat.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Examples:\n"
            "  zchat bench --quick                 # under 2 minutes\n"
            "  zchat bench --out results/today     # full run, under 15 minutes\n"
            "  zchat bench --scenarios fanout latency --systems zchat zmq-proxy\n"
            "  zchat bench --encryption --quick     # CURVE against plaintext and IO_THREADS=2"
        ),
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, under 2 minutes")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds; figures mean nothing)")
    parser.add_argument("--out", help="results folder [results/bench-MODE-TIMESTAMP]")
    parser.add_argument(
        "--scenarios", nargs="+", metavar="NAME",
        help=f"some of: {', '.join(SCENARIOS)} (comma or space separated) [all]",
    )
    parser.add_argument("--systems", nargs="+", metavar="NAME", help="some of: zchat, zmq-proxy, py-forwarder, redis, threaded, zchat-plain, zchat-io2 [the first five]")
    parser.add_argument(
        "--encryption", action="store_true",
        help="what CURVE costs: ingest, fan-out 100 and latency for zchat (CURVE), zchat-plain (test-only plaintext) "
        "and zchat-io2 (CURVE, IO_THREADS=2), side by side",
    )
    parser.add_argument("--profile", action="store_true", help="sample the zchat broker with py-spy during ingest and fan-out 100")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (databases, server logs)")
    return parser.parse_args(argv)


def _split(values: list[str] | None, allowed: tuple[str, ...], what: str, default: tuple[str, ...] | None = None) -> list[str]:
    if not values:
        return list(allowed if default is None else default)
    out = []
    for value in values:
        for item in value.replace(",", " ").split():
            if item not in allowed:
                raise SystemExit(f"bench: unknown {what} {item!r}; choose from {', '.join(allowed)}")
            if item not in out:
                out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    from zchat.bench import procs, report, scenarios
    from zchat.bench import profile as prof
    from zchat.bench import servers
    from zchat.bench.common import SYSTEMS, VARIANTS, Sizes

    args = parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = Sizes.mode(mode)
    if args.encryption:
        args.scenarios = args.scenarios or ["ingest", "fanout", "latency"]
        args.systems = args.systems or ["zchat", *VARIANTS]
    wanted = _split(args.scenarios, SCENARIOS, "scenario")
    systems = _split(args.systems, SYSTEMS + VARIANTS, "system", SYSTEMS)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"results/bench-{mode}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    if "redis" in systems:
        why = servers.redis_available()
        if why:
            skipped["redis"] = why
            systems.remove("redis")
    if args.profile and prof.available():
        print(f"bench: --profile ignored: {prof.available()}", file=sys.stderr)
        args.profile = False
    soft, hard = procs.raise_nofile()

    # The steps, so the progress bar knows its length.
    steps: list[tuple[str, Callable[[], dict]]] = []
    workdir = scenarios.new_workdir()
    bench: Any = None

    def add(label: str, fn: Callable[[], dict]) -> None:
        steps.append((label, fn))

    def each(fn: Callable[[str], dict]) -> None:
        for system in systems:
            add("", lambda s=system: fn(s))

    if "ingest" in wanted:
        for pubs in sizes.ingest_pubs:
            each(lambda s, p=pubs: bench.ingest(s, p))
    if "fanout" in wanted or "loss" in wanted:
        for subs in (100,) if args.encryption else sizes.fanout_subs:
            each(lambda s, n=subs: bench.fanout(s, n))
    if "latency" in wanted:
        for subs in sizes.latency_subs:
            each(lambda s, n=subs: bench.latency(s, n))
    if "stall" in wanted:
        for stalled in (False, True):
            each(lambda s, w=stalled: bench.stall(s, w))
    if "scale" in wanted:
        for n in sizes.scale_clients:
            each(lambda s, k=n: bench.scale(s, k))
    if "chat" in wanted:
        from zchat.bench import chat

        each(lambda s: chat.run(bench, s))
    if "history" in wanted and "zchat" in systems:
        add("", lambda: bench.history())

    # A zchat scale size too big for this machine gets one more run at the largest size that fits.
    extra_scale = []
    if "scale" in wanted and "zchat" in systems:
        for n in sizes.scale_clients:
            if scenarios.FDS_PER_CLIENT_AT_SERVER["zchat"] * n + scenarios.FD_MARGIN > hard:
                extra_scale.append(n)
    for n in extra_scale:
        def scale_max(n: int = n) -> dict:
            # The descriptor limit allows max_clients (6,000 here), but set-up there takes 2-5
            # minutes on this machine (every join returns the whole member list): 5,000 fits the budget.
            feasible = min(scenarios.max_clients("zchat", hard), scenarios.SCALE_MAX_RUN)
            row = bench._guard("scale-max", feasible, "zchat", lambda: bench._scale_run("zchat", feasible))
            row["instead_of"] = n
            return row
        add("", scale_max)

    progress = Progress(len(steps))
    bench = scenarios.Bench(sizes, systems, progress, workdir)
    if args.profile:
        profile_dir = out / "profile"
        original = bench._traffic

        def traffic(system: str, label: str, **kw: Any) -> dict:
            if system == "zchat" and label in ("ingest4", "ingest1", "fanout100", "fanout10", "latency10", "latency1"):
                kw["on_go"] = prof.recorder(profile_dir, label)
            return original(system, label, **kw)

        bench._traffic = traffic  # type: ignore[method-assign]

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    rows: list[dict] = []
    try:
        print(f"bench: {mode} mode, {len(steps)} runs, systems: {', '.join(systems)}; results in {out}", file=sys.stderr)
        for _, fn in steps:
            rows.append(fn())
        progress.finish()
    except KeyboardInterrupt:
        print("\nbench: interrupted; tearing everything down", file=sys.stderr)
        procs.stop_all()
        return 130
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    meta = {
        "mode": mode,
        "when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}",
        "elapsed_s": time.monotonic() - started,
        "systems": systems,
        "skipped": skipped,
        "nofile": [soft, hard],
        "sizes": sizes.__dict__,
        "versions": _versions(),
    }
    if args.profile and (out / "profile").exists():
        meta["profile"] = {}
        for raw in sorted((out / "profile").glob("profile-*.txt")):
            meta["profile"][raw.stem] = prof.summarize(raw)
    text = report.markdown(meta, rows, systems)
    if skipped:
        text += "\n" + "\n".join(f"- {LABEL}: not measured: {why}" for LABEL, why in skipped.items()) + "\n"
    if meta.get("profile"):
        text += "\n## Where the zchat broker's time goes (py-spy, share of samples)\n"
        for name, summary in meta["profile"].items():
            text += f"\n{name} ({summary['samples']} samples), self time:\n\n"
            text += "\n".join(f"- {share:4.1f}%  {func}" for func, share in summary["self"][:12]) + "\n"
    files = report.plots(out, rows, systems)
    (out / "results.md").write_text(text)
    report.write_json(out / "results.json", meta, rows)
    print(text)
    print(f"bench: wrote {out / 'results.md'}, {out / 'results.json'}" + "".join(f", {out / f}" for f in files or ()), file=sys.stderr)
    if files is None:
        print("bench: no plots (matplotlib is not installed)", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


def _versions() -> dict[str, str]:
    import zmq

    from zchat import __version__

    versions = {"zchat": __version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}
    try:
        import redis

        versions["redis-py"] = redis.__version__
    except ImportError:
        pass
    try:
        import hiredis

        versions["hiredis"] = getattr(hiredis, "__version__", "?")
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe:
        import subprocess

        try:
            versions["redis-server"] = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=5).stdout.split()[2]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    return versions


if __name__ == "__main__":
    sys.exit(main())
