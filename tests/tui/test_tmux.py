"""End to end in a real terminal: ``zchat talk`` inside tmux against a real broker
process, with a second user sending from the ``zchat send`` CLI.

The test types with ``tmux send-keys`` and reads the screen with ``capture-pane -p``.
It uses a private tmux server (``-L``) and kills only that server.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from typing import Callable

import pytest

from tests.conftest import BrokerProcess

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    def __init__(self, env: dict[str, str]) -> None:
        self.socket = f"zchat-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.env = env

    def run(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], env=self.env, capture_output=True, text=True, timeout=15)
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def start(self, command: str) -> None:
        self.run("new-session", "-d", "-x", "120", "-y", "40", "-s", "talk", command)

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.run("send-keys", "-t", "talk", *(["-l"] if literal else []), *keys)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "talk")

    def wait(self, predicate: Callable[[str], bool], what: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; the screen:\n{text}")
            time.sleep(0.05)  # polling interval, not a wait for an event

    def kill(self) -> None:
        """Stop this test's tmux server (only it) and remove its socket file."""
        try:
            path = self.run("display-message", "-p", "#{socket_path}").strip()
        except RuntimeError:
            path = ""
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], env=self.env, capture_output=True, timeout=15)
        if path.endswith(self.socket):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def zchat(env: dict[str, str], *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a zchat CLI command; if it hangs, fail with the Python stacks it was stuck in."""
    proc = subprocess.Popen([sys.executable, "-m", "zchat", *args], env=dict(env, PYTHONFAULTHANDLER="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        out, err = proc.communicate()
        raise AssertionError(f"zchat {' '.join(args)} did not finish in {timeout}s; its stacks:\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_talk_in_a_real_terminal(broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    env = dict(cli_env, TERM="xterm-256color")
    tmux = Tmux(env)
    talk = shlex.join([sys.executable, "-m", "zchat", "talk", "--broker", broker_proc.endpoint])  # no --name: asked
    # the pane outlives the program so that its exit status (or a traceback) can be read
    tmux.start(f"cd {shlex.quote(os.getcwd())} && {talk}; echo \"talk exited with $?\"; sleep 60")
    try:
        tmux.wait(lambda s: "Your chat name" in s, "the name prompt")
        tmux.keys("carol", literal=True)
        tmux.keys("Enter")
        screen = tmux.wait(lambda s: "● connected" in s and "carol" in s and "#general" in s, "the connected status line")
        assert "Windows" in screen and "Members" in screen

        sent = zchat(env, "send", "--broker", broker_proc.endpoint, "--name", "dave", "--room", "general", "hello from the cli")
        assert sent.returncode == 0, sent.stderr
        tmux.wait(lambda s: "hello from the cli" in s and "dave" in s, "dave's line on carol's screen")

        tmux.keys("hi dave, I see you", literal=True)
        tmux.keys("Enter")
        tmux.wait(lambda s: "hi dave, I see you" in s, "carol's own line")

        tmux.keys("da", literal=True)
        tmux.keys("Tab")
        tmux.wait(lambda s: "dave: " in s, "the completed nick in the input line")
        tmux.keys("tab completion works", literal=True)
        tmux.keys("Enter")
        tmux.wait(lambda s: "dave: tab completion works" in s, "the completed line sent")

        tmux.keys("/me waves", literal=True)
        tmux.keys("Enter")
        tmux.wait(lambda s: "carol waves" in s, "the action")

        tmux.keys("/frobnicate", literal=True)
        tmux.keys("Enter")
        tmux.wait(lambda s: "unknown command /frobnicate" in s, "the error line")

        tail = zchat(env, "tail", "--broker", broker_proc.endpoint, "--name", "dave", "--room", "general",
                     "--history", "20", "--json", "--timeout", "2")
        said = [(m["sender"], m["kind"], m["text"]) for m in map(json.loads, tail.stdout.splitlines()) if m["sender"] == "carol"]
        assert said == [("carol", "join", ""), ("carol", "text", "hi dave, I see you"),
                        ("carol", "text", "dave: tab completion works"), ("carol", "me", "waves")]

        tmux.keys("/quit", literal=True)
        tmux.keys("Enter")
        screen = tmux.wait(lambda s: "talk exited with" in s, "talk to exit")
        assert "talk exited with 0" in screen
        assert "Traceback" not in screen
    finally:
        tmux.kill()


def test_fast_keys_and_a_bracketed_paste_in_a_real_terminal(broker_proc: BrokerProcess, cli_env: dict[str, str]) -> None:
    """Issue 11 as a user meets it: keys sent to the terminal in one go, Enter in the
    middle, and a three-line paste (tmux pastes with CR between lines, bracketed)."""
    env = dict(cli_env, TERM="xterm-256color")
    tmux = Tmux(env)
    talk = shlex.join([sys.executable, "-m", "zchat", "talk", "--broker", broker_proc.endpoint, "--name", "erin"])
    tmux.start(f"cd {shlex.quote(os.getcwd())} && {talk}; echo \"talk exited with $?\"; sleep 60")
    try:
        tmux.wait(lambda s: "● connected" in s and "erin" in s and "#general" in s, "the connected status line")
        tmux.keys("yes, 1.4 is out", "Enter", "/me celebrates", "Enter")  # one write to the terminal
        tmux.wait(lambda s: "erin celebrates" in s, "the action")
        tmux.run("set-buffer", "-b", "lines", "pasted one\npasted two\npasted three")
        tmux.run("paste-buffer", "-p", "-d", "-b", "lines", "-t", "talk")
        tmux.wait(lambda s: "erin pasted three" in s, "the last pasted line")
        tmux.keys("marker", "Enter")
        tmux.wait(lambda s: "erin marker" in s, "the marker line")

        tail = zchat(env, "tail", "--broker", broker_proc.endpoint, "--name", "dave", "--room", "general",
                     "--history", "20", "--json", "--timeout", "2")
        said = [(m["kind"], m["text"]) for m in map(json.loads, tail.stdout.splitlines()) if m["sender"] == "erin" and m["kind"] != "join"]
        assert said == [("text", "yes, 1.4 is out"), ("me", "celebrates"), ("text", "pasted one"),
                        ("text", "pasted two"), ("text", "pasted three"), ("text", "marker")]

        tmux.keys("C-q")
        screen = tmux.wait(lambda s: "talk exited with" in s, "talk to exit")
        assert "talk exited with 0" in screen and "Traceback" not in screen
    finally:
        tmux.kill()
