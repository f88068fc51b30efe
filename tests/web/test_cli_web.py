"""`zchat web` as a subprocess: TLS with --tls-cert/--tls-key (and Secure cookies), and
clear errors for bad flags."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess
from tests.web.browser import WebProcess


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command to make a test certificate")
def test_tls_serves_https_and_secure_cookies(broker_proc: BrokerProcess, tmp_path: Path, cli_env: dict[str, str]) -> None:
    cert, key = _self_signed(tmp_path)
    web = WebProcess(broker_proc.endpoint, tmp_path / "web", cli_env, "--tls-cert", str(cert), "--tls-key", str(key)).start()
    try:
        url = web.url.replace("http://", "https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        page = urllib.request.urlopen(url + "/", context=ctx, timeout=10).read().decode()
        assert 'id="signin-form"' in page
        req = urllib.request.Request(
            url + "/api/signup", data=json.dumps({"name": "tess", "password": "correct horse battery"}).encode(),
            headers={"Content-Type": "application/json", "Origin": url}, method="POST",
        )
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            flags = [f.strip().lower() for f in resp.headers["Set-Cookie"].split(";")]
        assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain http is not served on the TLS port
            urllib.request.urlopen(web.url + "/", timeout=5)
    finally:
        web.stop()


def test_bad_flags_are_clear(cli_env: dict[str, str], tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zchat", "web", *args], env=cli_env, capture_output=True, text=True, timeout=30, check=False)

    bad = run("--listen", "nonsense")
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    half = run("--tls-cert", str(cert))
    assert half.returncode == 2 and "--tls-key" in half.stderr
    assert "--tls-cert" in run("--help").stdout
