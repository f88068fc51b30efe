"""The compose demo's irc service: it exposes the IRC port on the host's loopback and
reaches the broker by service name (docker-compose config, no containers)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (apt-get install -y docker-compose)")
def test_compose_exposes_the_irc_port(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZCHAT_", "COMPOSE_", "DOCKER_"))}
    proc = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "--project-directory", str(ROOT), "config"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = lines.index("  irc:")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("  ") and not lines[i].startswith("   "))
    irc = "\n".join(lines[start:end])
    assert "- irc\n" in irc and "0.0.0.0:6667" in irc and "tcp://broker:5555" in irc
    assert "127.0.0.1:6667:6667" in irc  # on the host's loopback only
    assert "accounts:/data" in irc  # the accounts outlive the container
