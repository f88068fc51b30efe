"""A real redis-server for the integration tests: loopback only, no persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import stop_process

STARTUP_DEADLINE = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _start(exe: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start redis-server on a free port and wait (with a deadline) until it answers."""
    port = _free_port()
    log = workdir / f"redis-{port}.log"
    cmd = [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
           "--dir", str(workdir), "--logfile", str(log)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + STARTUP_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{text}")
        if _pings(port):
            return proc, port
        time.sleep(0.02)  # poll interval, not a wait for readiness
    proc.kill()
    proc.wait()
    raise RuntimeError(f"redis-server did not answer PING on port {port} within {STARTUP_DEADLINE}s")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed")
    workdir = tmp_path_factory.mktemp("redis")
    for attempt in range(3):  # another process may grab the free port before redis does
        try:
            proc, port = _start(exe, workdir)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc, timeout=10)
