"""Running a broker for real: Prometheus metrics scraped over HTTP from a broker
subprocess, ``zchat status`` through the CLI, logs in a rotated file."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BrokerProcess, free_port_base
from zchat import __version__, keys
from zchat import protocol as p
from zchat.client import AuthError, Client, ClientError


def zchat(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zchat", *args], env=env, capture_output=True, text=True, timeout=timeout)


def scrape(url: str, timeout: float = 15.0) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET ``url`` (polling until it answers) and parse it with prometheus_client's own
    parser: sample name -> {sorted labels: value}."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.headers["Content-Type"].startswith("text/plain"), response.headers["Content-Type"]
                text = response.read().decode()
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # polling interval, not a wait for an event
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


@pytest.fixture
def metrics_broker(tmp_path: Path, cli_env: dict[str, str]):  # type: ignore[no-untyped-def]
    port = free_port_base(1)
    # Retention on (keeping ten years: nothing goes) so that its metrics are served too.
    proc = BrokerProcess(tmp_path / "history.db", cli_env, "--heartbeat", "0.5", "--retain-days", "3650", "--metrics", f"127.0.0.1:{port}").start()
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
    yield proc
    output = proc.stop()
    assert "metrics at http://127.0.0.1:" in output
    assert "history closed cleanly" in output  # SIGTERM stops the metrics thread too


async def test_metrics_scraped_over_http_move_with_real_traffic(metrics_broker: BrokerProcess) -> None:
    url = metrics_broker.metrics_url  # type: ignore[attr-defined]
    before = await asyncio.to_thread(scrape, url)
    assert value(before, "zchat_lines_received_total") == 0
    assert value(before, "zchat_messages_stored_total") == 0
    assert value(before, "zchat_sessions") == 0
    [(labels, info)] = before["zchat_broker_info"].items()
    assert info == 1 and dict(labels)["version"] == __version__ and len(dict(labels)["epoch"]) == 16
    assert value(before, "process_resident_memory_bytes") > 0  # the default process collector
    assert value(before, "process_open_fds") > 0

    alice = Client(metrics_broker.endpoint, "alice", "secret-of-alice-0123456789")
    bob = Client(metrics_broker.endpoint, "bob", "secret-of-bob-0123456789")
    rogue = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    rogue.linger = 0
    # A CURVE peer with a fresh key: a look-only session, which claims no name.
    server_key = await keys.fetch_key(metrics_broker.endpoint, zmq.asyncio.Context.instance(), timeout=30)  # asked again until then (2 s was short at load 7)
    assert server_key
    rogue.curve_serverkey = server_key.encode()
    rogue.curve_publickey, rogue.curve_secretkey = zmq.curve_keypair()
    try:
        await alice.connect()
        await bob.connect()
        await alice.join("dev")
        await bob.join("dev")
        for i in range(20):
            await alice.send("dev", f"line {i}")
        assert len(await bob.history("dev", 50)) == 22  # two joins and 20 lines
        with pytest.raises(ClientError) as refused:
            await alice.send("nowhere", "not a member")
        assert refused.value.code == p.ErrorCode.UNKNOWN_ROOM
        rogue.connect(metrics_broker.endpoint)
        await rogue.send(b"\xc1 not msgpack")
        error = p.decode_reply(await asyncio.wait_for(rogue.recv(), 10))
        assert isinstance(error, p.Error) and error.code == p.ErrorCode.BAD_ENCODING
        during = await asyncio.to_thread(scrape, url)
    finally:
        rogue.close(linger=0)
        await alice.close()
        await bob.close()

    assert value(during, "zchat_lines_received_total") == 21
    assert value(during, "zchat_messages_stored_total") == 22
    assert value(during, "zchat_acks_total") >= 1
    assert value(during, "zchat_publications_total") >= 1
    assert value(during, "zchat_published_events_total") >= 22  # the lines, joins and presences
    assert value(during, "zchat_errors_total", code="unknown_room", what="line") == 1
    assert value(during, "zchat_errors_total", code="bad_encoding", what="request") == 1
    assert value(during, "zchat_bad_input_total", kind="bad_encoding") == 1
    assert value(during, "zchat_history_requests_total", kind="last") == 1
    assert not before.get("zchat_zap_decisions_total")
    assert value(during, "zchat_zap_decisions_total", verdict="accepted") >= 3  # a handshake per connection
    assert value(during, "zchat_sessions") == 2  # the rogue never said hello
    assert value(during, "zchat_users_online") == 2
    assert value(during, "zchat_users") == 2  # the rogue's key owns no name: it claimed none
    assert value(during, "zchat_rooms") == 1
    assert value(during, "zchat_messages") == 22
    assert value(during, "zchat_storage_bytes") > 0
    assert value(during, "zchat_storage_append_seconds_count") >= 1
    assert value(during, "zchat_storage_append_seconds_bucket", le="+Inf") == value(during, "zchat_storage_append_seconds_count")
    assert value(during, "zchat_loop_turn_seconds_count") > value(before, "zchat_loop_turn_seconds_count")
    assert value(during, "zchat_connections") >= 3  # at least one a peer (the guard counts as its monitors tell)
    assert value(during, "zchat_uptime_seconds") > value(before, "zchat_uptime_seconds")
    # The Grafana dashboard in docs/ asks only for what the broker serves.
    dashboard = json.loads((Path(__file__).parents[2] / "docs" / "grafana-zchat.json").read_text())
    asked = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"\b(?:zchat|process)_[a-z_]+", target["expr"])}
    assert asked and asked <= set(during), asked - set(during)


    # Another key claiming a taken name is a refused handshake (the claim's second dial).
    with pytest.raises(AuthError):
        await Client(metrics_broker.endpoint, "alice", "not-the-secret-of-alice-000").connect()
    deadline = time.monotonic() + 10
    while not (await asyncio.to_thread(scrape, url))["zchat_zap_decisions_total"].get((("verdict", "refused"),)):
        assert time.monotonic() < deadline, "the refused handshake was never counted"
        await asyncio.sleep(0.05)


def test_metrics_are_off_by_default_and_refuse_a_public_address(broker_proc: BrokerProcess, cli_env: dict[str, str], tmp_path: Path) -> None:
    assert "metrics at" not in broker_proc.stop()
    port = free_port_base(1)
    for address, why in ((f"0.0.0.0:{port}", "not a loopback address"), ("10.1.2.3:9464", "--metrics-public"), ("nonsense", "HOST:PORT")):
        done = zchat(cli_env, "broker", "--bind", f"tcp://127.0.0.1:{free_port_base()}", "--db", str(tmp_path / "x.db"), "--metrics", address)
        assert done.returncode == 2, (address, done.stdout, done.stderr)
        assert why in done.stderr, done.stderr
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens there
    assert not (tmp_path / "x.db").exists()  # refused before anything was opened


def test_metrics_port_in_use_is_a_clear_error(cli_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = zchat(cli_env, "broker", "--bind", f"tcp://127.0.0.1:{free_port_base()}", "--db", str(tmp_path / "x.db"), "--metrics", f"127.0.0.1:{port}")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"cannot serve metrics at 127.0.0.1:{port}" in done.stderr


def test_status_through_the_cli(broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    b = broker_proc.endpoint
    first = zchat(cli_env, "status", "--broker", b, "--json")
    assert first.returncode == 0, first.stderr
    before = json.loads(first.stdout)
    assert before["version"] == __version__
    assert before["storage"] == f"sqlite {broker_proc.db}"
    assert before["storage_bytes"] > 0
    assert before["messages"] == 0 and before["rooms"] == 0
    assert before["sessions"] == 1 and before["users_online"] == 0  # itself, a look-only session
    assert before["uptime"] > 0
    assert before["search_behind"] >= 0 and before["search_bytes"] > 0  # SQLite's index file (its lag: test_search_index_lag_in_status)
    assert before["limits"]["heartbeat"] == 0.5  # as the broker was started
    assert before["limits"]["max_per_address"] == 100000 and before["limits"]["claims_per_minute"] == 0
    assert before["limits"]["reserved_names"] == "admin,root,system,zchat"
    for key in ("rate", "burst", "request_rate", "room_rate", "max_rooms", "max_bytes", "queue_budget", "send_budget"):
        assert key in before["limits"], key
    for key in ("lines_received", "messages_stored", "lines_refused", "history_requests"):
        assert key in before["rates"], key
    for i in range(3):
        sent = zchat(cli_env, "send", "--broker", b, "--name", "carol", "--room", "general", f"line {i}")
        assert sent.returncode == 0, sent.stderr
    second = zchat(cli_env, "status", "--broker", b, "--json")
    assert second.returncode == 0, second.stderr
    after = json.loads(second.stdout)
    assert after["epoch"] == before["epoch"] and after["boot"] == before["boot"]
    assert after["messages"] == 4  # a join and three lines
    assert after["rooms"] == 1 and after["users"] == 1
    assert after["uptime"] > before["uptime"]
    assert after["rates"]["lines_received"] > 0 and after["rates"]["messages_stored"] > 0
    text = zchat(cli_env, "status", "--broker", b)
    assert text.returncode == 0, text.stderr
    for label in ("uptime", "epoch      " + before["epoch"], "storage    sqlite", "search     index ", "messages   4", "limits", "rate=20.0"):
        assert label in text.stdout, (label, text.stdout)


def test_status_of_an_unreachable_broker_exits_3(cli_env: dict[str, str]) -> None:
    done = zchat(cli_env, "status", "--broker", f"tcp://127.0.0.1:{free_port_base()}", "--timeout", "1")
    assert done.returncode == 3, (done.stdout, done.stderr)


def test_log_file_rotates_and_keeps_the_backups_asked(tmp_path: Path, cli_env: dict[str, str]) -> None:
    log = tmp_path / "broker.log"
    broker = BrokerProcess(tmp_path / "h.db", cli_env, "--log-file", str(log), "--log-max-bytes", "2000", "--log-backups", "2").start()
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{log}.2").exists():  # each ping logs a connect and a goodbye
            assert time.monotonic() < deadline, "the log never rotated twice"
            done = zchat(cli_env, "ping", "--broker", broker.endpoint)
            assert done.returncode == 0, done.stderr
        for _ in range(3):
            assert zchat(cli_env, "ping", "--broker", broker.endpoint).returncode == 0
    finally:
        output = broker.stop()
    assert "broker up" not in output  # the log went to the file, not to stderr
    assert not Path(f"{log}.3").exists()
    for path in (log, Path(f"{log}.1"), Path(f"{log}.2")):
        assert path.stat().st_size <= 2000 + 500, path  # a file ends past the limit by at most one record
    assert "broker stopped; history closed cleanly" in log.read_text()
