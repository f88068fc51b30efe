"""A real weechat (Debian's weechat-headless: no terminal needed) against ``zchat irc``,
signing in with SASL PLAIN: it joins #general, its log shows a line from
``zchat send`` under the right nick, and a line written to its fifo is printed by
``zchat tail`` with the right sender. Skipped with the reason where it is missing."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.irc_gateway.conftest import IrcProcess
from tests.irc_gateway.test_irssi import Tail, zchat

pytestmark = pytest.mark.skipif(shutil.which("weechat-headless") is None, reason="weechat-headless is not installed (apt-get install weechat-headless)")


class Weechat:
    def __init__(self, home: Path, port: int, env: dict[str, str]) -> None:
        self.home = home
        commands = ";".join([
            "/set logger.file.flush_delay 0",
            "/set logger.file.path ${weechat_data_dir}/logs",
            "/set irc.look.temporary_servers on",
            f"/server add z 127.0.0.1/{port} -notls",
            "/set irc.server.z.nicks alice",
            "/set irc.server.z.sasl_mechanism plain",
            "/set irc.server.z.sasl_username alice",
            "/set irc.server.z.sasl_password alice-password-1",
            "/set irc.server.z.autojoin #general",
            "/connect z",
        ])
        self.proc = subprocess.Popen(
            ["weechat-headless", "--dir", str(home), "--run-command", commands], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def log(self, buffer: str) -> str:
        for path in (self.home / "logs").glob(f"*{buffer}*.weechatlog"):
            return path.read_text(errors="replace")
        return ""

    def fifo(self) -> Path | None:
        found = sorted(self.home.glob("weechat_fifo*"))
        return found[0] if found else None

    def command(self, text: str) -> None:
        fifo = self.fifo()
        assert fifo is not None, "weechat's fifo is not there"
        with open(fifo, "w") as fh:
            fh.write(text + "\n")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def weechat(irc_proc: IrcProcess, tmp_path: Path, cli_env: dict[str, str]) -> Iterator[Weechat]:
    home = tmp_path / "weechat"
    home.mkdir()
    w = Weechat(home, irc_proc.port, {**cli_env, "TERM": "dumb"})
    yield w
    w.stop()


def test_weechat_joins_reads_and_sends(weechat: Weechat, broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    wait_until(lambda: "alice" in weechat.log("#general"), 30, "weechat to join #general")
    zchat(cli_env, "send", "--broker", broker_proc.endpoint, "--name", "bob", "--room", "general", "hello weechat")
    wait_until(lambda: "hello weechat" in weechat.log("#general"), 20, "zchat send's line in weechat's #general log")
    line = next(x for x in weechat.log("#general").splitlines() if "hello weechat" in x)
    assert "\tbob\t" in line or "bob" in line.split("hello weechat")[0], line
    tail = Tail(broker_proc, cli_env, "reader", "general")
    try:
        wait_until(lambda: any(m["text"] == "hello weechat" for m in tail.messages), 30, "the tail to start")
        wait_until(lambda: weechat.fifo() is not None, 10, "weechat's fifo")
        weechat.command("irc.z.#general *hello from weechat")
        wait_until(lambda: any(m["text"] == "hello from weechat" for m in tail.messages), 20, "zchat tail to print weechat's line")
        mine = next(m for m in tail.messages if m["text"] == "hello from weechat")
        assert mine["sender"] == "alice"
    finally:
        tail.stop()
