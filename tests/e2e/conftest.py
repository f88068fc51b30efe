"""Fixtures for the fault tests: a broker subprocess without rate limits."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import HEARTBEAT, BrokerProcess


@pytest.fixture
def unlimited_broker(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[BrokerProcess]:
    """``zchat broker`` with rate 0 (no line, request or room budget: refusals would say
    nothing in a fault test); never left stopped by a failed test."""
    proc = BrokerProcess(tmp_path / "history.db", cli_env, "--heartbeat", str(HEARTBEAT), "--rate", "0").start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.proc.send_signal(signal.SIGCONT)
    proc.stop()
