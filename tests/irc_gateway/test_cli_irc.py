"""``zchat irc``'s refusals of unsafe or incomplete settings (subprocesses)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zchat", "irc", *args], env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--no-accounts", "--listen", "0.0.0.0:6667"), "loopback only"),
        (("--listen", "nonsense"), "HOST:PORT"),
        (("--history", "5000"), "5000"),
    ],
)
def test_refusals(cli_env: dict[str, str], args: tuple[str, ...], says: str) -> None:
    proc = run(cli_env, *args)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr


def test_tls_needs_both_files(cli_env: dict[str, str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    proc = run(cli_env, "--tls-cert", str(cert))
    assert proc.returncode == 2 and "both --tls-cert and --tls-key" in proc.stderr


def test_a_port_in_use_is_a_clear_error(cli_env: dict[str, str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run(cli_env, "--no-accounts", "--listen", f"127.0.0.1:{port}")
    assert proc.returncode == 1 and "cannot listen on" in proc.stderr, proc.stderr
