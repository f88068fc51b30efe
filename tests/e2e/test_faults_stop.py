"""Faults at load: the broker is stopped (SIGSTOP) for 15 s while clients send and read,
then resumed. Every client must show ``reconnecting`` while it is stopped and
``connected`` again after; every send that returned success must be in every reader's
view exactly once, in seq order, with no gap."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.e2e.fault_peer import Groups, check_views

GROUPS, SENDERS, READERS, LINES, RATE = 3, 6, 2, 80, 10.0
STOPPED = 15.0  # seconds: the fault's length, not a wait for something


@pytest.fixture
def broker_proc(unlimited_broker: BrokerProcess) -> BrokerProcess:
    return unlimited_broker


def last_states(groups: Groups) -> dict[str, str]:
    states: dict[str, str] = {}
    for name, state in groups.rows("state"):
        states[name] = state
    return states


def test_sigstop_15s_under_load_clients_reconnect_and_lose_nothing(broker_proc: BrokerProcess, tmp_path: Path) -> None:
    assert broker_proc.proc is not None
    groups = Groups(broker_proc.endpoint, broker_proc.env, tmp_path)
    clients = GROUPS * (SENDERS + READERS)
    total = GROUPS * SENDERS * LINES
    try:
        groups.start(GROUPS, SENDERS, READERS, LINES, RATE)
        wait_until(lambda: len(groups.rows("ready")) == clients or groups.alive(), 60, "clients")
        assert not groups.alive(), "a peer process ended early"
        groups.go()
        wait_until(lambda: len(groups.rows("ok")) >= total // 3, 60, "traffic before the stop")
        broker_proc.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        acked_before = len(groups.rows("ok"))
        wait_until(lambda: sum(1 for s in last_states(groups).values() if s == "reconnecting") == clients, STOPPED,
                   "every client to show reconnecting")
        while time.monotonic() - stopped < STOPPED:
            time.sleep(0.1)  # the broker stays stopped for STOPPED seconds in all
        acked_stopped = len(groups.rows("ok"))
        broker_proc.proc.send_signal(signal.SIGCONT)
        assert acked_stopped - acked_before <= GROUPS * SENDERS, "lines were acked by a stopped broker"
        wait_until(lambda: sum(1 for s in last_states(groups).values() if s == "connected") == clients, 60,
                   "every client connected again")
        wait_until(lambda: len(groups.rows("done")) == GROUPS * SENDERS, 120, "senders to finish")
        ok = {text for text, _seq in groups.rows("ok")}
        failed = groups.rows("fail")
        assert len(ok) + len(failed) == total
        assert not failed, f"sends failed (they are resent until acked within 60 s): {failed[:5]}"
        assert len(ok) > acked_stopped, "nothing was sent after the broker resumed"

        def caught_up() -> bool:
            views = groups.views()
            return len(views) == groups.readers and all(ok <= {m[2] for m in msgs} for msgs in views.values())

        wait_until(caught_up, 60, "readers to catch up")
        assert not groups.alive(), "a peer process ended early"
        check_views(groups, ok)
    finally:
        groups.stop()
