"""``zchat broker --show-address``, ``zchat admin invite`` and ``zchat keys`` as subprocesses
against a CURVE broker subprocess (each "device" its own CONFIG_DIR)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import HEARTBEAT, BrokerProcess
from zchat import keys


def zchat(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zchat", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_show_address_invites_and_a_second_device(tmp_path: Path, cli_env: dict[str, str]) -> None:
    db = tmp_path / "h.db"
    shown = zchat(cli_env, "broker", "--bind", "tcp://127.0.0.1:5999", "--db", str(db), "--show-address")
    assert shown.returncode == 0, shown.stderr
    address = shown.stdout.strip()
    endpoint, key = keys.split_address(address)
    assert endpoint == "tcp://127.0.0.1:5999" and key and keys.fingerprint(key) in shown.stderr
    assert (tmp_path / keys.KEY_FILE).stat().st_mode & 0o777 == 0o600

    broker = BrokerProcess(db, cli_env, "--heartbeat", str(HEARTBEAT), "--registration", "invite", "--admins", "boss").start()
    try:
        b = broker.endpoint
        out = broker  # noqa: F841
        code = zchat(cli_env, "admin", "invite", "--broker", b, "--name", "boss")
        assert code.returncode == 0, code.stderr
        invite = code.stdout.strip()
        assert zchat(cli_env, "admin", "invite", "--broker", b, "--name", "boss").stdout.strip() != invite
        sent = zchat(cli_env, "send", "--broker", b, "--name", "carol", "--invite", invite, "--room", "r", "hi")
        assert sent.returncode == 0, sent.stderr
        again = zchat(cli_env, "send", "--broker", b, "--name", "dave", "--invite", invite, "--room", "r", "hi")
        assert again.returncode == 1 and "refused the name 'dave'" in again.stderr
        assert zchat(cli_env, "admin", "invite", "--broker", b, "--name", "carol").returncode == 1  # not an admin

        phone = dict(cli_env, ZCHAT_CONFIG_DIR=str(tmp_path / "phone"))
        shown_key = zchat(phone, "keys", "show", "--name", "carol")
        assert shown_key.returncode == 0, shown_key.stderr
        phone_key = shown_key.stdout.strip()
        assert zchat(phone, "send", "--broker", b, "--name", "carol", "--room", "r", "x").returncode == 1  # not yet
        added = zchat(cli_env, "keys", "add", phone_key, "--broker", b, "--name", "carol")
        assert added.returncode == 0, added.stderr
        listed = zchat(cli_env, "keys", "list", "--broker", b, "--name", "carol")
        assert phone_key in listed.stdout and listed.stdout.count("\n") == 2
        from_phone = zchat(phone, "send", "--broker", b, "--name", "carol", "--room", "r", "from the phone")
        assert from_phone.returncode == 0, from_phone.stderr
        revoked = zchat(cli_env, "keys", "revoke", phone_key, "--broker", b, "--name", "carol")
        assert revoked.returncode == 0, revoked.stderr
        assert zchat(phone, "send", "--broker", b, "--name", "carol", "--room", "r", "x").returncode == 1
    finally:
        log = broker.stop()
    assert "INSECURE" not in log and "fingerprint " + keys.fingerprint(key) in log
