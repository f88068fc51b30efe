"""The web chat in a real headless Chromium (Selenium, the system's chromium-driver),
on real `zchat web` and `zchat broker` subprocesses, beside `zchat send`/`tail` users.

The four groups of issue 16's "Done when": chatting (rooms, DMs, names, order),
history and reconnects (reload, broker restart), injection (payloads shown as text),
and sign-in security (wrong password, taken name, cookie flags, foreign Origin).
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.web.browser import Page, WebProcess, chrome, free_port, missing

pytestmark = [pytest.mark.skipif(bool(missing()), reason=missing() or "browser present"), pytest.mark.slow]

PASSWORD = "correct horse battery"


@pytest.fixture
def web(broker_proc: BrokerProcess, tmp_path: Path, cli_env: dict[str, str]) -> Iterator[WebProcess]:
    proc = WebProcess(broker_proc.endpoint, tmp_path / "web", cli_env).start()
    yield proc
    proc.stop()


@pytest.fixture
def browsers() -> Iterator:  # type: ignore[type-arg]
    drivers: list = []

    def make() -> object:
        driver = chrome()
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.quit()


def page(browsers, web: WebProcess, name: str | None = None) -> Page:  # type: ignore[no-untyped-def]
    pg = Page(browsers(), web.url).open()
    if name:
        assert pg.sign(name, PASSWORD, create=True) == ""
    return pg


def cli(env: dict[str, str], broker: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zchat", *args, "--broker", broker], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_two_browsers_and_a_cli_user_chat_in_a_room_and_a_dm(browsers, web: WebProcess, broker_proc: BrokerProcess, cli_env) -> None:
    alice, bob = page(browsers, web, "alice"), page(browsers, web, "bob")
    tail = subprocess.Popen(
        [sys.executable, "-m", "zchat", "tail", "--name", "dave", "--room", "general", "--json", "--count", "3", "--history", "0",
         "--broker", broker_proc.endpoint], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: cli(cli_env, broker_proc.endpoint, "who", "--room", "general").stdout.count("dave") > 0, 20, "dave in general")
        alice.type("hello from alice")
        alice.wait(lambda: alice.texts() == ["hello from alice"] and alice.pending() == 0, what="alice's line stored")
        sent = cli(cli_env, broker_proc.endpoint, "send", "--name", "carol", "--room", "general", "hello from carol")
        assert sent.returncode == 0, sent.stderr
        bob.wait(lambda: bob.texts() == ["hello from alice", "hello from carol"], what="two lines at bob")
        bob.type("hello from bob")
        want = [("alice", "hello from alice"), ("carol", "hello from carol"), ("bob", "hello from bob")]
        for pg in (alice, bob):
            pg.wait(lambda pg=pg: [(ln["sender"], ln["text"]) for ln in pg.lines() if "kind-text" in ln["kind"]] == want, what="three lines in order")
        out, err = tail.communicate(timeout=30)
        got = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert [(g["sender"], g["text"]) for g in got if g.get("kind") == "text"] == want, err
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.communicate()
    # DMs: browser to browser, and a CLI user to a browser
    alice.type("/msg bob just for you")
    bob.switch("alice")
    bob.wait(lambda: bob.texts() == ["just for you"], what="the DM at bob")
    assert [ln["sender"] for ln in bob.lines()] == ["alice"]
    assert cli(cli_env, broker_proc.endpoint, "send", "--name", "carol", "--to", "alice", "psst alice").returncode == 0
    alice.wait(lambda: alice.js("return Array.from(document.querySelectorAll('#dm-list .name')).map(n => n.textContent)") == ["bob", "carol"],
               what="two DMs listed")
    alice.wait(lambda: alice.js("return document.querySelector('#dm-list button[data-room=\"@alice:carol\"] .unread').textContent") == "1",
               what="an unread count on carol's DM")
    alice.switch("carol")
    alice.wait(lambda: alice.texts() == ["psst alice"], what="carol's DM at alice")
    bob.switch("#general")
    assert bob.texts() == ["hello from alice", "hello from carol", "hello from bob"]


def test_reload_shows_history_once_and_a_broker_restart_loses_nothing(browsers, web: WebProcess, broker_proc: BrokerProcess, cli_env) -> None:
    alice, bob = page(browsers, web, "alice"), page(browsers, web, "bob")
    for i in range(3):
        alice.type(f"line {i}")
    alice.wait(lambda: alice.pending() == 0 and len(alice.texts()) == 3, what="3 lines stored")
    alice.type("two lines\nin one message (Shift-Enter)")
    alice.wait(lambda: alice.pending() == 0 and len(alice.texts()) == 4, what="the two-line message stored")
    alice.d.refresh()
    alice.wait(lambda: alice.chat_shown() and len(alice.texts()) == 4, what="the history after a reload")
    seqs = [ln["seq"] for ln in alice.lines()]
    assert alice.texts() == ["line 0", "line 1", "line 2", "two lines\nin one message (Shift-Enter)"] and len(seqs) == len(set(seqs))
    # the broker goes away: the indicator says so, a line typed meanwhile goes once
    broker_proc.stop()
    for pg in (alice, bob):
        pg.wait(lambda pg=pg: pg.indicator() == "reconnecting\u2026", timeout=30, what="the reconnect indicator")
    assert alice.js("return document.body.classList.contains('offline')")
    alice.type("typed while the broker was down")
    assert alice.pending() == 1
    broker_proc.start()
    for pg in (alice, bob):
        pg.wait(lambda pg=pg: pg.indicator() == "connected", timeout=40, what="connected again")
    assert cli(cli_env, broker_proc.endpoint, "send", "--name", "carol", "--room", "general", "right after the restart").returncode == 0
    want = ["line 0", "line 1", "line 2", "two lines\nin one message (Shift-Enter)", "typed while the broker was down", "right after the restart"]
    for pg in (alice, bob):
        pg.wait(lambda pg=pg: pg.texts() == want, timeout=40, what="every line once, in order")
    alice.wait(lambda: alice.pending() == 0, what="nothing left to send")
    bob.d.refresh()
    bob.wait(lambda: bob.chat_shown() and bob.texts() == want, what="the same after bob reloads")
    # the tab's own connection drops right after a line went out, before its confirmation:
    # the page sends it again on reconnecting (the same ref), the gateway posts it once
    alice.js("queueLine(S.current, 'sent as the socket dropped', false); S.ws.close();")
    want.append("sent as the socket dropped")
    for pg in (alice, bob):
        pg.wait(lambda pg=pg: pg.texts() == want and pg.pending() == 0, timeout=30, what="the line once after the drop")
    bob.type("marker")
    alice.wait(lambda: alice.texts() == [*want, "marker"], what="a later line (nothing doubled before it)")


def test_a_phone_sized_screen_with_the_keyboard_only(browsers, web: WebProcess) -> None:
    from selenium.webdriver.common.keys import Keys

    pg = Page(chrome(width=390, height=800), web.url).open()
    try:
        pg.wait(lambda: pg.focused() == "signin-name", what="the name field focused")
        assert pg.js("return window.innerWidth") <= 720
        pg.keys("dora", Keys.TAB, PASSWORD, Keys.TAB, Keys.TAB, Keys.TAB)  # past the invite and Sign in
        assert pg.focused() == "signup-button"
        pg.keys(Keys.ENTER)
        pg.wait(pg.chat_shown, what="signed up by keyboard")
        assert pg.focused() == "input"
        assert pg.js("return getComputedStyle(document.getElementById('rooms')).display") == "none"  # a panel on a phone
        pg.keys("/join dev", Keys.ENTER)
        pg.wait(lambda: pg.js("return document.getElementById('room-title').textContent") == "#dev", what="#dev")
        pg.keys("hello from a phone", Keys.ENTER)
        pg.wait(lambda: pg.texts() == ["hello from a phone"] and pg.pending() == 0, what="the line")
        pg.chord(Keys.ALT, Keys.ARROW_DOWN)  # the next room
        pg.wait(lambda: pg.js("return document.getElementById('room-title').textContent") == "#general", what="#general by Alt-Down")
        for _ in range(4):  # back through the log, sign out, members, to the rooms button
            pg.chord(Keys.SHIFT, Keys.TAB)
        assert pg.focused() == "toggle-rooms"
        pg.keys(Keys.ENTER)
        assert pg.js("return getComputedStyle(document.getElementById('rooms')).display") == "block"
        assert pg.js("return document.activeElement.classList.contains('room')")  # focus moved into the panel
        pg.keys(Keys.ESCAPE)
        assert pg.focused() == "input" and pg.js("return getComputedStyle(document.getElementById('rooms')).display") == "none"
        assert pg.js("return document.documentElement.scrollWidth <= window.innerWidth")  # nothing wider than the screen
    finally:
        pg.d.quit()


XSS = ['<script>window.__pwned = "script"</script>', '<img src=x onerror="window.__pwned = \'img\'">']


def _no_markup(pg: Page) -> None:
    assert pg.js("return window.__pwned === undefined"), "an injected script ran"
    assert pg.js("return document.querySelectorAll('#log img, #log script, #log b, #signin-error img, #room-list img, #dm-list img').length") == 0


def test_payloads_in_messages_names_and_rooms_are_text(browsers, web: WebProcess, broker_proc: BrokerProcess, cli_env) -> None:
    bob = page(browsers, web, "bob")
    # a name: refused by the broker's rules, and the refusal quotes it as text
    intruder = page(browsers, web)
    name = "<img src=x onerror=__pwned=1>"  # within the form's 32 characters
    error = intruder.sign(name, PASSWORD, create=True)
    assert "bad name" in error and name in error
    _no_markup(intruder)
    alice = page(browsers, web, "alice")
    for payload in XSS:
        alice.type(payload)
    assert cli(cli_env, broker_proc.endpoint, "send", "--name", "carol", "--room", "general", "<b>bold?</b> " + XSS[1]).returncode == 0
    want = [*XSS, "<b>bold?</b> " + XSS[1]]
    for pg in (alice, bob):
        pg.wait(lambda pg=pg: pg.texts() == want, what="the payloads as text")
        _no_markup(pg)
    # a room name and a DM peer: refused, the refusal shown as text
    room = "<img src=x onerror=__pwned=2>"
    alice.type("/join " + room)
    alice.wait(lambda: any(room in n for n in alice.notes()), what="the join refusal")
    alice.type("/msg <b>x</b> hello")
    alice.wait(lambda: any("not sent" in n for n in alice.notes()), what="the DM refusal")
    _no_markup(alice)
    assert "<b>x</b>" in " ".join(alice.notes())


def test_sign_in_security(browsers, web: WebProcess, tmp_path: Path) -> None:
    alice = page(browsers, web, "alice")
    # the session cookie: HttpOnly (no script sees it), SameSite=Strict, not Secure over plain http
    cookies = {c["name"]: c for c in alice.d.get_cookies()}
    session = cookies["zchat_session"]
    assert session["httpOnly"] is True and session["sameSite"] == "Strict" and session["secure"] is False
    assert "zchat_session" not in alice.js("return document.cookie")
    # a wrong password is refused; so is taking a name that is taken
    other = page(browsers, web)
    assert other.sign("alice", "not the password", create=False) == "wrong name or password"
    assert other.sign("nobody", PASSWORD, create=False) == "wrong name or password"
    assert "taken" in other.sign("alice", "another password", create=True)
    assert other.sign("alice", PASSWORD, create=False) == ""  # the owner's password works anywhere
    # a page of another origin (same site: the cookie goes along) cannot open the WebSocket
    evil = _evil_site(tmp_path, web.url)
    try:
        alice.d.get(evil + "/evil.html")
        alice.wait(lambda: alice.d.title.startswith(("REFUSED", "OPENED")), what="the evil page's verdict")
        assert alice.d.title == "REFUSED", alice.d.title
    finally:
        _evil_server.shutdown()
    alice.open()
    alice.wait(alice.chat_shown, what="alice still signed in")


_evil_server: http.server.ThreadingHTTPServer


def _evil_site(tmp_path: Path, target: str) -> str:
    """A page on another port of 127.0.0.1 (another origin, the same site) that tries the
    gateway's WebSocket with the user's cookie and writes what happened into its title."""
    global _evil_server
    root = tmp_path / "evil"
    root.mkdir()
    ws = target.replace("http://", "ws://") + "/ws"
    (root / "evil.html").write_text(f"""<!doctype html><title>waiting</title><script>
const ws = new WebSocket("{ws}");
ws.onopen = () => ws.send(JSON.stringify({{t: "hello", since: {{}}}}));
ws.onmessage = (ev) => {{ document.title = "OPENED " + ev.data.slice(0, 60); }};
ws.onclose = () => {{ if (!document.title.startsWith("OPENED")) document.title = "REFUSED"; }};
</script>""")
    port = free_port()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)
    _evil_server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=_evil_server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}"


def test_a_deleted_line_and_a_topic_show_as_moderation_lines(browsers, tmp_path: Path, cli_env) -> None:  # type: ignore[no-untyped-def]
    broker = BrokerProcess(tmp_path / "mod.db", cli_env, "--admins", "boss").start()
    web = WebProcess(broker.endpoint, tmp_path / "web-mod", cli_env).start()
    try:
        alice = page(browsers, web, "alice")
        alice.type("a line to regret")
        alice.type("a line to keep")
        alice.wait(lambda: alice.texts() == ["a line to regret", "a line to keep"] and alice.pending() == 0, what="two lines")
        seq = next(ln["seq"] for ln in alice.lines() if ln["text"] == "a line to regret")
        done = cli(cli_env, broker.endpoint, "admin", "delete", "--name", "boss", "general", str(seq))
        assert done.returncode == 0, done.stderr
        alice.wait(lambda: alice.texts() == ["a line to keep"], what="the deleted line hidden")
        actions = alice.js("return Array.from(document.querySelectorAll('#log li.action')).map(n => n.textContent)")
        assert any("(message deleted)" in a for a in actions) and any("boss deleted a message" in a for a in actions), actions
        alice.d.refresh()  # from history: the tombstone, not the text
        alice.wait(lambda: alice.chat_shown() and alice.texts() == ["a line to keep"], what="the same after a reload")
        assert "a line to regret" not in alice.js("return document.getElementById('log').textContent")
    finally:
        web.stop()
        broker.stop()
