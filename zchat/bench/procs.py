"""Child processes of the benchmark, and what we read about them from /proc.

Every process the benchmark starts is registered here by PID and torn down by PID
(SIGTERM, then SIGKILL) when its run ends, on error, on Ctrl-C and at exit. Children
also ask the kernel to kill them if the benchmark itself dies (PR_SET_PDEATHSIG), so
nothing outlives a crashed run.

Workers are forked from the orchestrator, which never opens a ZeroMQ context, an event
loop or a database connection of its own: each child starts clean.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import resource
import signal
import socket
import subprocess
import time
from typing import Any, Callable

_MP = multiprocessing.get_context("fork")
_CHILDREN: dict[int, Any] = {}  # pid -> Process or Popen
PR_SET_PDEATHSIG = 1


def mp() -> Any:
    return _MP


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the benchmark process goes away."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _child_entry(target: Callable[..., Any], args: tuple, log: str | None) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if log is not None:  # a server's own output goes to its log file, not to our terminal
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    target(*args)


def spawn(target: Callable[..., Any], *args: Any, log: str | None = None, name: str | None = None) -> Any:
    """Fork a registered child running ``target(*args)`` (its stdout and stderr to ``log``)."""
    proc = _MP.Process(target=_child_entry, args=(target, args, log), name=name, daemon=False)
    proc.start()
    _CHILDREN[proc.pid] = proc
    return proc


def popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """Start a registered external program (it dies with us too)."""
    proc = subprocess.Popen(cmd, preexec_fn=die_with_parent, **kwargs)
    _CHILDREN[proc.pid] = proc
    return proc


def _alive(proc: Any) -> bool:
    if isinstance(proc, subprocess.Popen):
        return proc.poll() is None
    return proc.is_alive()


def _reap(proc: Any, timeout: float) -> None:
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    else:
        proc.join(timeout)


def stop(proc: Any, grace: float = 3.0) -> None:
    """SIGCONT (in case it was stopped), SIGTERM, wait ``grace``, SIGKILL; by PID."""
    if proc is None:
        return
    pid = proc.pid
    if _alive(proc):
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
        _reap(proc, grace)
        if _alive(proc):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _reap(proc, 5.0)
    _CHILDREN.pop(pid, None)


def stop_all() -> None:
    """Tear down every child still registered, newest first."""
    for pid in reversed(list(_CHILDREN)):
        proc = _CHILDREN.get(pid)
        if proc is not None:
            stop(proc, grace=1.0)


atexit.register(stop_all)


def live_children() -> list[int]:
    return [pid for pid, proc in _CHILDREN.items() if _alive(proc)]


# ------------------------------------------------------------------ /proc readings

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the whole process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        try:
            import psutil  # type: ignore[import-not-found]

            times = psutil.Process(pid).cpu_times()
            return times.user + times.system
        except Exception:
            return float("nan")


def rss_bytes(pid: int) -> int:
    """Resident set size of the process, in bytes (0 when unknown)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


# ------------------------------------------------------------------ ports


def free_port_base(count: int = 3) -> int:
    """A port P with P..P+count-1 free on 127.0.0.1 right now."""
    for _ in range(500):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65535:
            continue
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range on 127.0.0.1")


def wait_listening(port: int, proc: Any, timeout: float = 20.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(proc):
            raise RuntimeError(f"server process {proc.pid} exited before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)  # polling interval, not a wait for an event
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")
