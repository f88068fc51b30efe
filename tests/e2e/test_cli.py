"""The CLI as users run it: real ``zchat`` subprocesses against a real broker subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time


from tests.conftest import BrokerProcess, free_port_base


def zchat(env: dict[str, str], *args: str, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zchat", *args], env=env, capture_output=True, text=True, timeout=timeout, input=input)


def test_send_then_tail_json(broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    b = broker_proc.endpoint
    for text in ("first line", "second line", "ünïcödé ✓"):
        done = zchat(cli_env, "send", "--broker", b, "--name", "carol", "--room", "general", text)
        assert done.returncode == 0, done.stderr
        assert "stored general" in done.stderr
    tail = zchat(cli_env, "tail", "--broker", b, "--name", "dave", "--room", "general", "--history", "10", "--json", "--count", "3", "--timeout", "10")
    assert tail.returncode == 0, tail.stderr
    rows = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [r["kind"] for r in rows] == ["join", "text", "text", "text"]  # --count counts chat lines only
    assert [r["text"] for r in rows if r["kind"] == "text"] == ["first line", "second line", "ünïcödé ✓"]
    assert [r["seq"] for r in rows] == [1, 2, 3, 4]
    assert {r["sender"] for r in rows if r["kind"] == "text"} == {"carol"}
    for key in ("room", "seq", "sender", "text", "ts", "id", "kind"):
        assert all(key in r for r in rows)


def test_tail_follows_live_messages(broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    b = broker_proc.endpoint
    tail = subprocess.Popen(
        [sys.executable, "-m", "zchat", "tail", "-b", b, "-n", "watcher", "-r", "live", "--history", "1", "--json", "--count", "2", "--timeout", "30"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first = json.loads(tail.stdout.readline())  # its own join line: now it is subscribed
        assert (first["kind"], first["sender"]) == ("join", "watcher")
        for i in range(2):
            assert zchat(cli_env, "send", "-b", b, "-n", "writer", "-r", "live", f"live {i}").returncode == 0
        out, err = tail.communicate(timeout=30)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert tail.returncode == 0, err
    rows = [first] + [json.loads(line) for line in out.splitlines()]
    assert [(r["kind"], r["sender"], r["text"]) for r in rows] == [
        ("join", "watcher", ""), ("join", "writer", ""), ("text", "writer", "live 0"), ("text", "writer", "live 1"),
    ]


def test_dm_who_rooms_ping(broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    b = broker_proc.endpoint
    assert zchat(cli_env, "send", "-b", b, "-n", "erin", "-r", "ops", "hello ops").returncode == 0
    assert zchat(cli_env, "send", "-b", b, "-n", "frank", "-r", "ops", "hi erin").returncode == 0
    dm = zchat(cli_env, "send", "-b", b, "-n", "erin", "--to", "frank", "psst")
    assert dm.returncode == 0 and "@erin:frank" in dm.stderr
    who = zchat(cli_env, "who", "-b", b, "--room", "ops", "--json")
    assert who.returncode == 0, who.stderr
    assert sorted(json.loads(line)["name"] for line in who.stdout.splitlines()) == ["erin", "frank"]
    rooms = zchat(cli_env, "rooms", "-b", b, "--json")
    assert [json.loads(line) for line in rooms.stdout.splitlines()] == [{"room": "ops", "members": 2, "online": 0}]
    ping = zchat(cli_env, "ping", "-b", b)
    assert ping.returncode == 0 and "answered" in ping.stdout


def test_unreachable_broker_is_a_clear_quick_error(cli_env: dict[str, str]) -> None:
    dead = f"tcp://127.0.0.1:{free_port_base()}"
    for args in (["ping", "--timeout", "1"], ["send", "-n", "x", "-r", "general", "hi"], ["who", "-r", "general"]):
        start = time.monotonic()
        done = zchat(cli_env, *args, "--broker", dead)
        assert done.returncode == 3, (args, done.stderr)
        assert "no answer from the broker" in done.stderr and "Traceback" not in done.stderr
        assert time.monotonic() - start < 15


def test_name_taken_and_bad_options(broker_proc: BrokerProcess, cli_env: dict[str, str], tmp_path) -> None:
    b = broker_proc.endpoint
    assert zchat(cli_env, "send", "-b", b, "-n", "gina", "-r", "general", "mine").returncode == 0
    other = dict(cli_env, ZCHAT_CONFIG_DIR=str(tmp_path / "other-machine"))
    stolen = zchat(other, "send", "-b", b, "-n", "gina", "-r", "general", "impostor")
    assert stolen.returncode == 1
    assert "refused the name 'gina'" in stolen.stderr and "Traceback" not in stolen.stderr
    cases = [
        (["send", "-b", b, "-n", "gina", "hi"], "exactly one of --room and --to"),
        (["send", "-b", b, "-r", "general", "hi"], "no name"),
        (["send", "-b", "localhost:5555", "-n", "gina", "-r", "general", "hi"], "tcp://"),
        (["send", "-b", b, "-n", "Not A Name", "-r", "general", "hi"], "name"),
        (["tail", "-b", b, "-n", "gina"], "--room"),
        (["broker", "--bind", "nonsense"], "tcp://"),
        (["ping", "--timeout", "soon"], "soon"),
    ]
    for args, words in cases:
        done = zchat(cli_env, *args)
        assert done.returncode == 2, (args, done.returncode, done.stderr)
        assert words in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    bad_room = zchat(cli_env, "send", "-b", b, "-n", "gina", "-r", "Bad Room!", "hi")
    assert bad_room.returncode == 1 and "bad room" in bad_room.stderr


def test_help_and_version(cli_env: dict[str, str]) -> None:
    version = zchat(cli_env, "--version")
    assert version.returncode == 0 and "zchat" in version.stdout
    for command in ("broker", "send", "tail", "who", "rooms", "ping", "talk", "bot", "config", "bench"):
        done = zchat(cli_env, command, "--help")
        assert done.returncode == 0 and "Example" in done.stdout, command


def test_sigterm_keeps_history_and_clients_reconnect(cli_env: dict[str, str], tmp_path) -> None:
    proc = BrokerProcess(tmp_path / "h.db", cli_env, "--heartbeat", "0.5").start()
    try:
        b = proc.endpoint
        for i in range(3):
            assert zchat(cli_env, "send", "-b", b, "-n", "hank", "-r", "general", f"kept {i}").returncode == 0
        tail = subprocess.Popen(
            [sys.executable, "-m", "zchat", "tail", "-b", b, "-n", "ivy", "-r", "general", "--history", "1", "--timeout", "60"],
            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert "ivy joined" in tail.stdout.readline()
        log = proc.stop(signal.SIGTERM)
        assert proc.proc is not None and proc.proc.returncode == 0, log
        assert "history closed cleanly" in log
        # the follower notices the broker going (its stderr carries state lines)
        states = []
        while not any("reconnecting" in line for line in states):
            line = tail.stderr.readline()
            assert line, f"tail ended without noticing: {states}"
            states.append(line)
        proc.start()
        assert zchat(cli_env, "send", "-b", b, "-n", "hank", "-r", "general", "after restart").returncode == 0
        assert "after restart" in tail.stdout.readline()
        tail.terminate()
        tail.wait(10)
        history = zchat(cli_env, "tail", "-b", b, "-n", "hank", "-r", "general", "--history", "10", "--json", "--count", "4", "--timeout", "10")
        texts = [json.loads(line)["text"] for line in history.stdout.splitlines() if json.loads(line)["kind"] == "text"]
        assert texts == ["kept 0", "kept 1", "kept 2", "after restart"]
    finally:
        proc.stop()


def test_second_broker_on_a_taken_port_says_so(broker_proc: BrokerProcess, cli_env: dict[str, str], tmp_path) -> None:
    done = zchat(cli_env, "broker", "--bind", broker_proc.endpoint, "--db", str(tmp_path / "other.db"), timeout=20)
    assert done.returncode == 1
    assert "cannot listen on" in done.stderr and "Traceback" not in done.stderr


def test_tail_count_counts_chat_lines_not_joins(broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    """fails on main: --count 1 printed the sender's join line and stopped before the message."""
    b = broker_proc.endpoint
    assert zchat(cli_env, "send", "-b", b, "-n", "kim", "-r", "general", "the message").returncode == 0
    tail = zchat(cli_env, "tail", "-b", b, "-n", "lee", "-r", "general", "--count", "1", "--timeout", "10")
    assert tail.returncode == 0, tail.stderr
    assert "<kim> the message" in tail.stdout
    assert "chat lines" in zchat(cli_env, "tail", "--help").stdout


def test_rooms_says_1_member(broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    """fails on main: "1 members"."""
    b = broker_proc.endpoint
    assert zchat(cli_env, "send", "-b", b, "-n", "mo", "-r", "solo", "alone here").returncode == 0
    assert zchat(cli_env, "send", "-b", b, "-n", "ned", "-r", "pair", "one").returncode == 0
    assert zchat(cli_env, "send", "-b", b, "-n", "mo", "-r", "pair", "two").returncode == 0
    rooms = zchat(cli_env, "rooms", "-b", b, "-n", "mo")
    assert rooms.returncode == 0, rooms.stderr
    counts = {line.split("\t")[0]: line.split("\t")[1] for line in rooms.stdout.splitlines()}
    assert counts == {"#pair": "2 members", "#solo": "1 member"}


def test_tail_reports_a_gap(cli_env: dict[str, str], tmp_path) -> None:
    """fails on main: a Gap printed nothing on stdout (no JSON record; the text went to stderr)."""
    proc = BrokerProcess(tmp_path / "h.db", cli_env, "--heartbeat", "0.5").start()
    procs = []
    try:
        b = proc.endpoint
        for i in range(3):
            assert zchat(cli_env, "send", "-b", b, "-n", "oscar", "-r", "general", f"old {i}").returncode == 0
        for mode in (["--json"], []):
            tail = subprocess.Popen(
                [sys.executable, "-m", "zchat", "tail", "-b", b, "-n", f"pat{len(procs)}", "-r", "general", "--history", "1", *mode, "--timeout", "60"],
                env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            procs.append(tail)
            assert f"pat{len(procs) - 1}" in tail.stdout.readline()  # its own join line: it follows the room
        proc.stop()
        proc.db = tmp_path / "replacement.db"  # the broker comes back with its history lost
        proc.start()

        def next_line(tail: subprocess.Popen, want: str) -> str:
            while want not in (line := tail.stdout.readline()):  # type: ignore[union-attr]
                assert line, f"tail ended before a line with {want!r}"
            return line

        record = json.loads(next_line(procs[0], '"gap"'))
        assert (record["kind"], record["room"], record["first"]) == ("gap", "general", 1) and record["last"] >= 4
        assert "reset" in record["reason"]
        text = next_line(procs[1], "missing")
        assert "#general" in text and "reset" in text
    finally:
        for tail in procs:
            tail.terminate()
            tail.wait(10)
        proc.stop()


def test_look_only_commands_claim_no_name(broker_proc: BrokerProcess, cli_env: dict[str, str], tmp_path) -> None:
    """fails on main: the second config dir on the same host was refused the derived name."""
    b = broker_proc.endpoint
    assert zchat(cli_env, "send", "-b", b, "-n", "quinn", "-r", "ops", "hi").returncode == 0
    other = dict(cli_env, ZCHAT_CONFIG_DIR=str(tmp_path / "second-config"))
    for env in (cli_env, other):
        ping = zchat(env, "ping", "-b", b)
        assert ping.returncode == 0 and "answered" in ping.stdout, ping.stderr
        who = zchat(env, "who", "-b", b, "-r", "ops", "--json")
        assert who.returncode == 0, who.stderr
        assert [json.loads(line)["name"] for line in who.stdout.splitlines()] == ["quinn"]
        rooms = zchat(env, "rooms", "-b", b, "--json")
        assert rooms.returncode == 0, rooms.stderr
        assert [json.loads(line)["room"] for line in rooms.stdout.splitlines()] == ["ops"]
    assert not list((tmp_path / "second-config").rglob("*cli-*")), "a name was claimed"
