"""The web page shows a sender's edits ("(edited)", the new text, no extra line) and
deletes (the line goes), live and after a reload: real Chromium, real subprocesses."""

# ruff: noqa: F811  (fixtures imported from test_browser are the tests' arguments)
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import BrokerProcess
from tests.web.browser import WebProcess, missing
from tests.web.test_browser import browsers, cli, page, web  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.skipif(bool(missing()), reason=missing() or "browser present"), pytest.mark.slow]


def as_bob(env: dict[str, str], broker: str, call: str) -> None:
    """One Client call as bob, in a subprocess (bob's secret is in the CLI's config dir)."""
    code = (
        "import asyncio\nfrom zchat.client import Client\n"
        "async def main():\n"
        f"    async with Client({broker!r}, 'bob') as c:\n"
        f"        await c.{call}\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def test_edits_and_deletes_show_in_the_page(browsers, web: WebProcess, broker_proc: BrokerProcess, cli_env) -> None:  # type: ignore[no-untyped-def]
    alice = page(browsers, web, "alice")
    for text in ("a line with a tpyo", "a line to regret"):
        done = cli(cli_env, broker_proc.endpoint, "send", "--name", "bob", "--room", "general", text)
        assert done.returncode == 0, done.stderr
    alice.wait(lambda: alice.texts() == ["a line with a tpyo", "a line to regret"], what="bob's lines")
    seqs = {ln["text"]: ln["seq"] for ln in alice.lines()}
    as_bob(cli_env, broker_proc.endpoint, f"edit('general', {seqs['a line with a tpyo']}, 'a line with a typo')")
    alice.wait(lambda: alice.texts() == ["a line with a typo", "a line to regret"], what="the edit, in place")
    assert "(edited)" in alice.js(f"return document.querySelector('#log li.msg[data-seq=\"{seqs['a line with a tpyo']}\"]').textContent")
    as_bob(cli_env, broker_proc.endpoint, f"delete_own('general', {seqs['a line to regret']})")
    alice.wait(lambda: alice.texts() == ["a line with a typo"], what="the deleted line gone")
    alice.d.refresh()  # from history: the latest text, marked, and the tombstone
    alice.wait(lambda: alice.chat_shown() and alice.texts() == ["a line with a typo"], what="the same after a reload")
    assert "(edited)" in alice.js("return document.getElementById('log').textContent")
    assert "tpyo" not in alice.js("return document.getElementById('log').textContent")
