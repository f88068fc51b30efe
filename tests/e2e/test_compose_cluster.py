"""docker-compose.cluster.yml for real: scripts/compose-cluster-smoke.sh builds the zchat
image (with the redis extra) and a Redis image from Debian's packages, runs Redis, two
brokers and two bots on each broker with podman-compose, and checks that bots on
different brokers heard each other."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "scripts" / "compose-cluster-smoke.sh"
COMPOSE_FILE = ROOT / "docker-compose.cluster.yml"
SKIPPED = 77


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(
    not (shutil.which("podman") and shutil.which("podman-compose")),
    reason="podman and podman-compose are not installed (apt-get install -y podman podman-compose runc debootstrap)",
)
def test_cluster_compose_bots_on_two_brokers_hear_each_other() -> None:
    proc = subprocess.run(
        ["bash", str(SMOKE)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1140, check=False
    )
    sys.stdout.write(proc.stdout)
    if proc.returncode == SKIPPED:
        pytest.skip(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "compose smoke skipped")
    assert proc.returncode == 0, f"compose-cluster-smoke.sh exited {proc.returncode}:\n{proc.stdout[-4000:]}"
    assert "OK: 4 bots in separate containers chatted through the brokers (across brokers)" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (apt-get install -y docker-compose)")
def test_cluster_compose_file_validates(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZCHAT_", "COMPOSE_", "DOCKER_"))}
    proc = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), "config"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for service in ("redis:", "broker-a:", "broker-b:", "alice:", "bob:", "carol:", "dave:"):
        assert service in out
    assert out.count("redis://redis:6379/0") == 2
    assert "tcp://broker-a:5555,tcp://broker-b:5555" in out and "tcp://broker-b:5555,tcp://broker-a:5555" in out


def test_cluster_smoke_script_is_valid_bash() -> None:
    assert os.access(SMOKE, os.X_OK), "scripts/compose-cluster-smoke.sh must be executable"
    subprocess.run(["bash", "-n", str(SMOKE)], check=True)
