"""Faults at load: the broker is killed (SIGKILL) twice while 6 senders and 3 live
readers run. Every send that returned success must be in every reader's output exactly
once, in seq order, and no reader may report a gap: they stay connected, so they catch up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, wait_until

PEER = Path(__file__).with_name("fault_peer.py")
SENDERS, READERS, LINES = 6, 3, 400


def spawn(broker: BrokerProcess, name: str, *args: str, log: Path) -> subprocess.Popen:
    env = dict(broker.env, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), broker.env.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, str(PEER), broker.endpoint, name, "load", *args],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )


def records(log: Path) -> list[dict]:
    rows = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


@pytest.fixture
def broker_proc(unlimited_broker: BrokerProcess) -> BrokerProcess:
    return unlimited_broker


def test_kill_9_twice_under_load_loses_and_doubles_nothing(broker_proc: BrokerProcess, tmp_path: Path) -> None:
    procs: list[subprocess.Popen] = []
    try:
        readers = {f"reader{i}": tmp_path / f"reader{i}.log" for i in range(READERS)}
        senders = {f"sender{i}": tmp_path / f"sender{i}.log" for i in range(SENDERS)}
        for name, log in readers.items():
            procs.append(spawn(broker_proc, name, "read", log=log))
        wait_until(lambda: all(any("ready" in r for r in records(log)) for log in readers.values()), 30, "readers")
        sending = [spawn(broker_proc, name, "send", str(LINES), log=log) for name, log in senders.items()]
        procs += sending

        def acked() -> int:
            return sum(1 for log in senders.values() for r in records(log) if "ok" in r)

        for kill in range(2):  # kill -9 while lines are flowing, then start again on the same file
            wait_until(lambda k=kill: acked() >= (k + 1) * SENDERS * LINES // 3, 60, f"traffic before kill {kill + 1}")
            assert any(p.poll() is None for p in sending), "the senders finished before the kill"
            broker_proc.stop(signal.SIGKILL)
            broker_proc.start()
        wait_until(lambda: all(p.poll() is not None for p in sending), 120, "senders to finish")
        ok = {r["ok"][0] for log in senders.values() for r in records(log) if "ok" in r}
        failed = [r["fail"] for log in senders.values() for r in records(log) if "fail" in r]
        assert len(ok) + len(failed) == SENDERS * LINES
        assert len(ok) >= SENDERS * LINES * 0.9, f"too many failed sends to say much: {failed[:5]}"

        def caught_up(log: Path) -> bool:
            return ok <= {r["msg"][2] for r in records(log) if "msg" in r}

        wait_until(lambda: all(caught_up(log) for log in readers.values()), 60, "readers to catch up")
        for name, log in readers.items():
            rows = records(log)
            gaps = [r["gap"] for r in rows if "gap" in r]
            assert not gaps, f"{name} reported gaps while connected: {gaps}"
            msgs = [r["msg"] for r in rows if "msg" in r]
            seqs = [m[0] for m in msgs]
            assert seqs == sorted(set(seqs)), f"{name}: seqs out of order or doubled"
            texts = [m[2] for m in msgs]
            assert len(texts) == len(set(texts)), f"{name}: a line delivered twice"
            assert ok <= set(texts)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
