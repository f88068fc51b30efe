"""The edge's settings (flags > ZCHAT_* > TOML > defaults), its queue arithmetic, and
the claim table, sans I/O; plus ``zchat broker --help`` and a real broker reading them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess
from zchat import config as cfg
from zchat import protocol as p
from zchat.guard import CLAIM_WINDOW, MAX_PENDING_CLAIMS, MiB, Claims, GuardConfig, connection_cap

NEW = ("max_per_address", "max_connections", "claims_per_minute", "claim_timeout", "reserved_names",
       "queue_budget", "send_budget", "handshake_timeout", "max_refusals", "cooloff")


def test_defaults_match_the_guard_defaults() -> None:
    s, sources = cfg.load_settings({}, None, env={"ZCHAT_CONFIG_DIR": "/nonexistent-zchat"})
    g = GuardConfig()
    assert (s.max_per_address, s.max_connections, s.claims_per_minute, s.claim_timeout) == (
        g.max_per_address, g.max_connections, g.claims_per_minute, g.claim_timeout)
    assert (s.queue_budget, s.send_budget, s.handshake_timeout) == (g.queue_budget, g.send_budget, g.handshake_timeout)
    assert (s.max_refusals, s.cooloff) == (g.max_refusals, g.cooloff)
    assert s.reserved() == g.reserved
    assert all(sources[name] == "default" for name in NEW)
    assert all(name in cfg.HELP for name in NEW)


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('max-per-address = 3\nclaims-per-minute = 9\nreserved-names = "ops, staff"\nqueue-budget = 1048576\n')
    env = {"ZCHAT_CLAIMS_PER_MINUTE": "7", "ZCHAT_SEND_BUDGET": "2097152"}
    s, sources = cfg.load_settings({"max_per_address": "11"}, path, env=env)
    assert (s.max_per_address, sources["max_per_address"]) == (11, "flag")
    assert (s.claims_per_minute, sources["claims_per_minute"]) == (7, "env ZCHAT_CLAIMS_PER_MINUTE")
    assert s.reserved() == ("ops", "staff") and sources["reserved_names"].startswith("file ")
    assert (s.queue_budget, s.send_budget) == (MiB, 2 * MiB)


@pytest.mark.parametrize(
    "flags, pattern",
    [
        ({"max_per_address": "0"}, r"'max_per_address'.*above 0"),
        ({"max_connections": "-1"}, r"'max_connections'.*0 or a positive"),
        ({"claims_per_minute": "lots"}, r"'claims_per_minute'.*integer"),
        ({"claim_timeout": "0"}, r"'claim_timeout'.*above 0"),
        ({"handshake_timeout": "-2"}, r"'handshake_timeout'.*above 0"),
        ({"max_refusals": "-1"}, r"'max_refusals'.*0 or a positive"),
        ({"cooloff": "0"}, r"'cooloff'.*above 0"),
        ({"reserved_names": "admin,Root"}, r"'reserved_names'.*'Root' is not one"),
        ({"queue_budget": "1000"}, r"'queue_budget'.*at least"),
        ({"send_budget": "1000"}, r"'send_budget'.*at least 1048576"),
    ],
)
def test_bad_values_are_clear_errors(flags: dict, pattern: str) -> None:
    with pytest.raises(cfg.ConfigError, match=pattern):
        cfg.load_settings(flags, None, env={"ZCHAT_CONFIG_DIR": "/nonexistent-zchat"})


def test_queue_sizes_follow_the_byte_budgets() -> None:
    g = GuardConfig()
    assert g.rcvhwm(2 * p.MAX_MESSAGE_BYTES) == 32  # 32 x 128 KiB = 4 MiB
    assert g.router_sndhwm() == 16  # 16 x 1 MiB replies = 16 MiB
    assert g.xpub_sndhwm(100_000, 256 * 1024) == 64  # 64 x 256 KiB publications = 16 MiB
    assert g.xpub_sndhwm(4, 256 * 1024) == 4  # never above Limits.pub_hwm
    small = GuardConfig(queue_budget=1, send_budget=1)
    assert (small.rcvhwm(2 * p.MAX_MESSAGE_BYTES), small.router_sndhwm(), small.xpub_sndhwm(10)) == (1, 1, 1)
    for budget in (4 * MiB, 9 * MiB):
        g = GuardConfig(queue_budget=budget)
        assert g.rcvhwm(128 * 1024) * 128 * 1024 <= budget


def test_the_total_cap_stays_below_the_descriptor_limit() -> None:
    assert connection_cap(GuardConfig(), 1024) == 1024 - 64 - 51
    assert connection_cap(GuardConfig(max_connections=100), 1024) == 100
    assert connection_cap(GuardConfig(max_connections=5000), 1024) == 909  # clamped, with a warning
    assert connection_cap(GuardConfig(), 256) < 256


def test_claims_per_address_per_minute() -> None:
    claims = Claims(per_minute=2, timeout=30)
    assert claims.wait("10.0.0.1", 100.0) == 0.0
    claims.claimed("10.0.0.1", "a", b"d", 100.0)
    claims.claimed("10.0.0.1", "b", b"d", 110.0)
    assert claims.wait("10.0.0.1", 120.0) == pytest.approx(40.0)  # until the first leaves the window
    assert claims.wait("10.0.0.2", 120.0) == 0.0  # other addresses are not held back
    assert claims.wait("10.0.0.1", 100.0 + CLAIM_WINDOW) == 0.0
    assert Claims(per_minute=0, timeout=30).wait("x", 0.0) == 0.0  # 0: no limit


def test_claims_due_after_their_timeout_once() -> None:
    claims = Claims(per_minute=5, timeout=30)
    claims.claimed("a", "n1", b"d1", 0.0)
    claims.claimed("a", "n2", b"d2", 10.0)
    assert claims.due(29.0) == []
    assert claims.due(30.0) == [("n1", b"d1")]
    assert claims.due(100.0) == [("n2", b"d2")]
    assert claims.due(200.0) == []


def test_the_claim_tables_are_bounded() -> None:
    claims = Claims(per_minute=1, timeout=30)
    for i in range(MAX_PENDING_CLAIMS):
        claims.pending[f"n{i}"] = (1e9, b"")
    assert claims.wait("fresh", 0.0) > 0  # full: new claims wait, owned names still work
    claims = Claims(per_minute=1, timeout=30)
    for i in range(20_000):
        if claims.wait(f"a{i}", float(i) / 1000) == 0.0:
            claims.claimed(f"a{i}", f"n{i}", b"", float(i) / 1000)
        claims.pending.clear()
    assert len(claims.recent) <= 10_000


def test_broker_help_lists_the_edge_settings(cli_env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-m", "zchat", "broker", "--help"], env=cli_env, capture_output=True, text=True, check=True).stdout
    for flag in ("--max-per-address", "--max-connections", "--claims-per-minute", "--claim-timeout",
                 "--reserved-names", "--queue-budget", "--send-budget", "--handshake-timeout", "--max-refusals", "--cooloff"):
        assert flag in out


def test_a_real_broker_reads_them_from_env_and_flags(tmp_path: Path, cli_env: dict[str, str]) -> None:
    env = dict(cli_env, ZCHAT_QUEUE_BUDGET=str(MiB), ZCHAT_RESERVED_NAMES="ops")
    proc = BrokerProcess(
        tmp_path / "h.db", env, "--max-per-address", "7", "--claims-per-minute", "3", "--send-budget", str(8 * MiB),
    ).start()
    out = proc.stop()
    assert "edge: 7 connections from one address a port" in out
    assert "rcvhwm 8 (1024 KiB a connection)" in out
    assert "ROUTER sndhwm 8, XPUB sndhwm 32; 3 new names an address a minute; reserved ops" in out
    assert "descriptor limit: soft" in out
    bad = subprocess.run([sys.executable, "-m", "zchat", "broker", "--max-per-address", "0"], env=cli_env, capture_output=True, text=True)
    assert bad.returncode != 0 and "max_per_address" in bad.stderr
