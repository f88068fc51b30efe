"""``zchat room ...`` and ``zchat admin ...`` as users run them: real subprocesses
against a real (CURVE) broker subprocess."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import HEARTBEAT, BrokerProcess
from tests.e2e.test_cli import zchat


@pytest.fixture
def admin_broker(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(tmp_path / "rooms.db", cli_env, "--heartbeat", str(HEARTBEAT), "--admins", "root").start()
    yield proc
    proc.stop()


def ok(env: dict[str, str], *args: str) -> str:
    done = zchat(env, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def refused(env: dict[str, str], *args: str) -> str:
    done = zchat(env, *args)
    assert done.returncode == 1, (done.stdout, done.stderr)
    return done.stderr


def test_room_commands_end_to_end(admin_broker: BrokerProcess, cli_env: dict[str, str]) -> None:
    b = ("--broker", admin_broker.endpoint)
    ok(cli_env, "send", *b, "--name", "bob", "--room", "lobby", "hi")  # bob exists
    ok(cli_env, "send", *b, "--name", "carol", "--room", "lobby", "hi")
    ok(cli_env, "room", "create", *b, "--name", "alice", "sec")
    assert "private" in refused(cli_env, "tail", *b, "--name", "bob", "--room", "sec", "--timeout", "1")
    assert "forbidden" in refused(cli_env, "room", "invite", *b, "--name", "bob", "sec", "carol")
    assert "sec" not in ok(cli_env, "rooms", *b, "--name", "bob")
    ok(cli_env, "room", "invite", *b, "--name", "alice", "sec", "bob")
    ok(cli_env, "send", *b, "--name", "bob", "--room", "sec", "let me in")
    ok(cli_env, "room", "topic", *b, "--name", "alice", "sec", "the", "plans")
    ok(cli_env, "room", "op", *b, "--name", "alice", "sec", "bob")
    ok(cli_env, "room", "deop", *b, "--name", "bob", "sec", "alice")
    ok(cli_env, "room", "ban", *b, "--name", "bob", "sec", "alice", "no", "reason")
    ok(cli_env, "room", "unban", *b, "--name", "bob", "sec", "alice")
    ok(cli_env, "room", "invite", *b, "--name", "bob", "sec", "carol")
    assert "not_member" in refused(cli_env, "room", "kick", *b, "--name", "bob", "sec", "carol")
    ok(cli_env, "send", *b, "--name", "carol", "--room", "sec", "thanks")
    ok(cli_env, "room", "kick", *b, "--name", "bob", "sec", "carol", "bye")
    rows = [json.loads(line) for line in ok(cli_env, "tail", *b, "--name", "bob", "--room", "sec", "--history", "50", "--json", "--timeout", "1").splitlines()]
    actions = [(r["kind"], r["sender"], r["to"], r["text"]) for r in rows if r["kind"] not in ("join", "part", "text")]
    assert actions == [
        ("invite", "alice", "bob", ""), ("topic", "alice", "", "the plans"), ("op", "alice", "bob", ""),
        ("deop", "bob", "alice", ""), ("ban", "bob", "alice", "no reason"), ("unban", "bob", "alice", ""),
        ("invite", "bob", "carol", ""), ("kick", "bob", "carol", "bye"),
    ]
    assert "sec" in ok(cli_env, "rooms", *b, "--name", "bob")


def test_admin_commands_end_to_end(admin_broker: BrokerProcess, cli_env: dict[str, str]) -> None:
    b = ("--broker", admin_broker.endpoint)
    ok(cli_env, "send", *b, "--name", "root", "--room", "lobby", "admin here")
    ok(cli_env, "send", *b, "--name", "bob", "--room", "lobby", "spam spam")
    rows = [json.loads(line) for line in ok(cli_env, "tail", *b, "--name", "root", "--room", "lobby", "--history", "10", "--json", "--timeout", "1").splitlines()]
    spam = next(r["seq"] for r in rows if r["text"] == "spam spam")
    assert "forbidden" in refused(cli_env, "admin", "delete", *b, "--name", "bob", "lobby", str(spam))
    ok(cli_env, "admin", "delete", *b, "--name", "root", "lobby", str(spam))
    rows = [json.loads(line) for line in ok(cli_env, "tail", *b, "--name", "root", "--room", "lobby", "--history", "10", "--json", "--timeout", "1").splitlines()]
    assert [(r["kind"], r["text"]) for r in rows if r["seq"] == spam] == [("deleted", "")]
    assert ("delete", str(spam)) in [(r["kind"], r["text"]) for r in rows]
    ok(cli_env, "admin", "ban", *b, "--name", "root", "bob")
    assert refused(cli_env, "send", *b, "--name", "bob", "--room", "lobby", "back")
    ok(cli_env, "admin", "unban", *b, "--name", "root", "bob")
    ok(cli_env, "send", *b, "--name", "bob", "--room", "lobby", "back")
    ok(cli_env, "admin", "release", *b, "--name", "root", "bob")
    # the name is free again: another key (another config dir, another secret) claims it
    other = dict(cli_env, ZCHAT_CONFIG_DIR=cli_env["ZCHAT_CONFIG_DIR"] + "-other")
    ok(other, "send", *b, "--name", "bob", "--room", "fresh", "new bob")


def test_the_rooms_bench_prints_its_figures(cli_env: dict[str, str]) -> None:
    done = zchat(cli_env, "bench", "--rooms", "--members", "40", "--clients", "3", "--repeats", "3", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'notices': 39" in done.stdout and "kick_to_all_caught_up_ms_median" in done.stdout
