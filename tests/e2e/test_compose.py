"""The docker-compose demo, for real: scripts/compose-smoke.sh builds the image and runs
the broker and three bots in separate containers with podman-compose, then checks that
they heard each other and that the broker's history holds the conversation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "scripts" / "compose-smoke.sh"
DEMO = ROOT / "scripts" / "demo.sh"
COMPOSE_FILE = ROOT / "docker-compose.yml"
SKIPPED = 77


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not (shutil.which("podman") and shutil.which("podman-compose")),
    reason="podman and podman-compose are not installed (apt-get install -y podman podman-compose runc debootstrap)",
)
def test_compose_demo_runs_in_containers():
    proc = subprocess.run(
        ["bash", str(SMOKE)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=840
    )
    sys.stdout.write(proc.stdout)  # shown by pytest when the test fails (or with -s)
    if proc.returncode == SKIPPED:
        pytest.skip(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "compose smoke skipped")
    assert proc.returncode == 0, f"compose-smoke.sh exited {proc.returncode}:\n{proc.stdout[-4000:]}"
    assert "OK: 3 bots in separate containers chatted" in proc.stdout
    assert "web: the page answers on" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (apt-get install -y docker-compose)")
def test_docker_compose_config_validates(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZCHAT_", "COMPOSE_", "DOCKER_"))}
    proc = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), "config"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for service in ("broker:", "alice:", "bob:", "carol:", "talk:", "web:"):
        assert service in out
    assert "127.0.0.1:8080:8080" in out  # the web chat, published on the host
    assert "tcp://0.0.0.0:5555" in out and "/data/history.db" in out
    assert "tcp://broker:5555" in out
    assert "healthcheck:" in out and "ping" in out
    # only the broker container binds; every client reaches it by service name
    assert "ZCHAT_BROKER: tcp://broker:5555" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_demo_script(tmp_path):
    """scripts/demo.sh: a broker and three bots as local processes, then `zchat tail`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZCHAT_")}
    env.update(PYTHON=sys.executable, DEMO_LINES="3", TMPDIR=str(tmp_path))
    proc = subprocess.run(
        ["bash", str(DEMO)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = proc.stdout
    for bot in ("alice", "bob", "carol"):
        assert f"<{bot}> hello" in out, out
    assert "re @" in out, out  # a bot answered a mention: lines crossed between processes
    assert list(tmp_path.iterdir()) == [], "demo.sh left files behind"


def test_scripts_are_valid_bash():
    assert os.access(DEMO, os.X_OK), "scripts/demo.sh must be executable"
    subprocess.run(["bash", "-n", str(DEMO)], check=True)


def test_smoke_script_is_valid_bash():
    assert os.access(SMOKE, os.X_OK), "scripts/compose-smoke.sh must be executable"
    subprocess.run(["bash", "-n", str(SMOKE)], check=True)
