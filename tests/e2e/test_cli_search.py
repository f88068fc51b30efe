"""``zchat search`` as users run it: real subprocesses against a real (CURVE) broker
subprocess on SQLite."""

from __future__ import annotations

import json

from tests.conftest import BrokerProcess
from tests.e2e.test_cli import zchat
from tests.e2e.test_cli_rooms import admin_broker, ok  # noqa: F401  (fixture)


def test_search_end_to_end(admin_broker: BrokerProcess, cli_env: dict[str, str]) -> None:  # noqa: F811
    b = ("--broker", admin_broker.endpoint)
    ok(cli_env, "send", *b, "--name", "alice", "--room", "ops", "deploy failed on staging")
    ok(cli_env, "send", *b, "--name", "bob", "--room", "ops", "deploy fixed")
    ok(cli_env, "send", *b, "--name", "bob", "--to", "alice", "about that deploy")
    ok(cli_env, "room", "create", *b, "--name", "alice", "sec")
    ok(cli_env, "send", *b, "--name", "alice", "--room", "sec", "secret deploy keys")

    rows = [json.loads(line) for line in ok(cli_env, "search", *b, "--name", "alice", "deploy", "--json").splitlines()]
    assert [(r["room"], r["sender"], r["text"]) for r in rows] == [
        ("sec", "alice", "secret deploy keys"), ("@alice:bob", "bob", "about that deploy"),
        ("ops", "bob", "deploy fixed"), ("ops", "alice", "deploy failed on staging"),
    ]
    assert all(r["seq"] > 0 and r["ts"] > 0 for r in rows)
    carol = ok(cli_env, "search", *b, "--name", "carol", "deploy")  # neither the DM nor the private room
    assert "deploy fixed" in carol and "deploy failed" in carol and "secret" not in carol and "about that" not in carol
    assert "#ops <alice> deploy failed on staging" in carol

    page = [json.loads(line) for line in ok(cli_env, "search", *b, "--name", "alice", "--room", "ops", "dep*", "--limit", "1", "--json").splitlines()]
    assert [r.get("text") for r in page] == ["deploy fixed", None] and page[1]["kind"] == "more"
    rest = [json.loads(line) for line in ok(
        cli_env, "search", *b, "--name", "alice", "--room", "ops", "dep*", "--before", str(page[1]["before"]), "--json"
    ).splitlines()]
    assert [r["text"] for r in rest] == ["deploy failed on staging"]
    assert [json.loads(line)["text"] for line in ok(cli_env, "search", *b, "--name", "alice", "--room", "@bob", "deploy", "--json").splitlines()] == [
        "about that deploy"
    ]

    done = zchat(cli_env, "search", *b, "--name", "carol", "--room", "sec", "deploy")
    assert done.returncode == 1 and "private" in done.stderr
    done = zchat(cli_env, "search", *b, "--name", "carol", "nothing-like-this")
    assert done.returncode == 0 and done.stdout == "" and "nothing found" in done.stderr
