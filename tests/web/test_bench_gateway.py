"""``zchat bench --gateway`` keeps working, end to end at a tiny size: its table and its
JSON. No assertion here is about speed or memory (the figures are the machine's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("reader", ["sans-io", "asyncio"])
def test_gateway_bench_runs_and_every_line_arrives(tmp_path: Path, cli_env: dict[str, str], reader: str) -> None:
    out = tmp_path / "gw.json"
    proc = subprocess.run(
        [sys.executable, "-m", "zchat", "bench", "--gateway", "--users", "4", "--lines", "5", "--rate", "50", "--reader", reader, "--out", str(out)],
        cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "| web (through zchat web) |" in proc.stdout and "| direct zchat clients |" in proc.stdout
    assert "MB per 100 users" in proc.stdout
    data = json.loads(out.read_text())
    assert data["expected_each"] == 20 and data["reader"] == reader
    for kind in ("web", "direct"):
        assert data[kind]["delivered"] == 20 and data[kind]["complete_users"] == 4, data
        assert data[kind]["p99_ms"] >= data[kind]["p50_ms"] > 0
    assert data["gateway_rss_per_user_mb"] > 0 and data["web_close_codes"] == {}
