"""Sampling the zchat broker with py-spy while a scenario runs (``--profile``)."""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Callable

from zchat.bench import procs


def available() -> str | None:
    """Why py-spy cannot be used, or None."""
    return None if shutil.which("py-spy") else "py-spy not installed (pip install py-spy)"


def recorder(out_dir: Path, label: str, rate: int = 100) -> Callable[[int], Callable[[], None]]:
    """An ``on_go`` hook: start py-spy on the broker PID (a flame graph and raw stacks)."""

    def start(pid: int) -> Callable[[], None]:
        exe = shutil.which("py-spy")
        if exe is None:
            return lambda: None
        out_dir.mkdir(parents=True, exist_ok=True)
        runs = []
        for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt")):
            cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking", "--format", fmt,
                   "-o", str(out_dir / f"profile-{label}.{suffix}")]
            runs.append(procs.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def stop() -> None:
            for proc in runs:
                try:
                    os.kill(proc.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
                except ProcessLookupError:
                    pass
            for proc in runs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
                procs.stop(proc)

        return stop

    return start


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3", "/zchat/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/zchat/":
                path = "zchat/" + path
            break
    return f"{m.group('func')} ({path})"


def summarize(raw: Path, top: int = 15) -> dict:
    """Self and inclusive shares of the samples, per function, from py-spy's raw output."""
    self_time: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        frames = [f for f in frames if "zchat/bench/" not in f and "multiprocessing/" not in f]  # the fork's ancestry
        if not frames:
            continue
        total += n
        self_time[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    share = lambda c: [(name, round(100.0 * v / total, 1)) for name, v in c.most_common(top)] if total else []  # noqa: E731
    return {"samples": total, "self": share(self_time), "inclusive": share(incl)}
