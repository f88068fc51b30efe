"""A real irssi (Debian's package) in a private tmux server against ``zchat irc``:
it joins #general, sees a line from ``zchat send`` under the right nick, sends one
that ``zchat tail`` prints with the right sender, and receives a DM from a zchat
user as a private message. Skipped with the reason where irssi or tmux is missing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.irc_gateway.conftest import IrcProcess

pytestmark = [
    pytest.mark.skipif(shutil.which("irssi") is None, reason="irssi is not installed (apt-get install irssi)"),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)"),
]


class Tmux:
    """A private tmux server (its own socket name) running one program."""

    def __init__(self, name: str, command: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = env
        subprocess.run(["tmux", "-L", name, "new-session", "-d", "-x", "150", "-y", "40", command], check=True, env=env)

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "-L", self.name, "send-keys", *keys], check=True, env=self.env)

    def type(self, text: str) -> None:
        self.keys("-l", text)
        self.keys("Enter")

    def screen(self) -> str:
        out = subprocess.run(["tmux", "-L", self.name, "capture-pane", "-p", "-S", "-200"], check=False, capture_output=True, text=True, env=self.env)
        return out.stdout

    def wait(self, text: str, timeout: float = 20.0) -> str:
        try:
            wait_until(lambda: text in self.screen(), timeout, f"{text!r} on irssi's screen")
        except AssertionError:
            raise AssertionError(f"{text!r} not on the screen:\n{self.screen()}") from None
        return self.screen()

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.name, "kill-server"], check=False, capture_output=True, env=self.env)


class Tail:
    """``zchat tail --json`` as a subprocess; its lines parsed in ``messages``."""

    def __init__(self, broker: BrokerProcess, env: dict[str, str], name: str, room: str) -> None:
        cmd = [sys.executable, "-m", "zchat", "tail", "--broker", broker.endpoint, "--name", name, "--room", room, "--json"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.messages: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.messages.append(json.loads(line))
            except ValueError:
                pass

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def zchat(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "zchat", *args], env=env, check=True, capture_output=True, timeout=60)


@pytest.fixture
def irssi(irc_proc: IrcProcess, tmp_path: Path, cli_env: dict[str, str]) -> Iterator[Tmux]:
    home = tmp_path / "irssi-home"
    home.mkdir()
    sockets = tempfile.mkdtemp(prefix="zt-")  # a socket path in tmp_path would be too long
    env = {**cli_env, "TERM": "screen", "TMUX_TMPDIR": sockets}
    name = "irssi"
    command = f"irssi --home={home} -c 127.0.0.1 -p {irc_proc.port} -n alice -w alice-password-1"
    tmux = Tmux(name, command, env)
    yield tmux
    tmux.kill()
    shutil.rmtree(sockets, ignore_errors=True)


def test_irssi_joins_reads_sends_and_gets_a_dm(irssi: Tmux, broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    irssi.wait("Welcome to zchat")
    zchat(cli_env, "send", "--broker", broker_proc.endpoint, "--name", "bob", "--room", "general", "hello from zchat send")
    irssi.type("/join #general")
    screen = irssi.wait("hello from zchat send")
    line = next(x for x in screen.splitlines() if "hello from zchat send" in x)
    assert "bob" in line, line  # "< bob> hello from zchat send"
    zchat(cli_env, "send", "--broker", broker_proc.endpoint, "--name", "bob", "--room", "general", "--me", "nods at irssi")
    screen = irssi.wait("nods at irssi")
    line = next(x for x in screen.splitlines() if "nods at irssi" in x)
    assert "* bob nods at irssi" in line, line  # irssi shows a CTCP ACTION
    tail = Tail(broker_proc, cli_env, "reader", "general")
    try:
        wait_until(lambda: any(m["text"] == "hello from zchat send" for m in tail.messages), 30, "the tail to start")
        irssi.type("hello from irssi")
        wait_until(lambda: any(m["text"] == "hello from irssi" for m in tail.messages), 20, "zchat tail to print irssi's line")
        mine = next(m for m in tail.messages if m["text"] == "hello from irssi")
        assert mine["sender"] == "alice" and mine["room"] == "general"
        irssi.type("/me waves from irssi")  # CTCP ACTION -> a zchat action
        wait_until(lambda: any(m["text"] == "waves from irssi" for m in tail.messages), 20, "zchat tail to print irssi's /me")
        assert next(m for m in tail.messages if m["text"] == "waves from irssi")["kind"] == "me"
    finally:
        tail.stop()
    talk = subprocess.Popen(  # a zchat talk user (its line mode: the same commands as the screen)
        [sys.executable, "-m", "zchat", "talk", "--broker", broker_proc.endpoint, "--name", "carol", "--plain"],
        env=cli_env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert talk.stdin is not None
        talk.stdin.write("/msg alice a private word from talk\n")
        talk.stdin.flush()
        wait_until(lambda: "carol" in irssi.screen(), 30, "irssi to open a query with carol")
        irssi.type("/window goto carol")  # irssi opened a query window for the private message
        screen = irssi.wait("a private word from talk")
        line = next(x for x in screen.splitlines() if "a private word from talk" in x)
        assert "carol" in line, line
    finally:
        talk.terminate()
        talk.wait(10)
