"""Real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) on
a real `zchat web` subprocess in front of a real `zchat broker` subprocess (CURVE).

Nothing is downloaded: the driver and the browser are the system's. Without them the
browser tests are skipped with the reason (see ``missing``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
WebDriverException: type[Exception] = Exception  # selenium's, once it is imported (it may be missing)
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def missing() -> str:
    """Why browser tests cannot run here ('' when they can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)"
    if not os.path.exists(CHROMEDRIVER):
        return "no chromedriver (apt-get install chromium-driver)"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WebProcess:
    """``zchat web`` as a subprocess, on a free port."""

    def __init__(self, broker: str, data: Path, env: dict[str, str], *extra: str) -> None:
        self.broker = broker
        self.data = data
        self.env = env
        self.extra = extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> WebProcess:
        cmd = [sys.executable, "-m", "zchat", "web", "--listen", f"127.0.0.1:{self.port}", "--broker", self.broker,
               "--data-dir", str(self.data), "--log-level", "INFO", *self.extra]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"zchat web exited: {self.proc.stdout.read() if self.proc.stdout else ''}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.02)  # polling interval, not a wait for an event
        raise RuntimeError("zchat web did not start listening within 20s")

    def stop(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""


def chrome(width: int = 1200, height: int = 800):  # type: ignore[no-untyped-def]
    """A headless Chromium of the system's, with its own profile (cookies)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-dev-shm-usage", f"--window-size={width},{height}", "--lang=en-US"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


# JavaScript that reads the page's state for assertions (the page's own DOM, as a user sees it).
LINES_JS = """
return Array.from(document.querySelectorAll('#log li.msg')).map(li => ({
  seq: Number(li.dataset.seq), room: li.dataset.room, kind: li.className,
  sender: (li.querySelector('.sender') || {}).textContent || '',
  text: (li.querySelector('.text') || {}).textContent || ''}));
"""


class Page:
    """One browser user on the chat page."""

    def __init__(self, driver: Any, url: str) -> None:
        global WebDriverException
        from selenium.common.exceptions import WebDriverException
        self.d = driver
        self.url = url

    def open(self) -> Page:
        self.d.get(self.url + "/")
        return self

    def wait(self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "the page") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except WebDriverException as exc:  # an element not there yet
                last = exc
            else:
                if last:
                    return last
            time.sleep(0.05)  # polling interval
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r}); notes: {self.notes()}")

    def js(self, script: str, *args: Any) -> Any:
        return self.d.execute_script(script, *args)

    def sign(self, name: str, password: str, create: bool) -> str:
        """Fill the sign-in form and press Sign in or Create account; the error shown, or ''."""
        from selenium.webdriver.common.by import By

        self.wait(lambda: self.d.find_element(By.ID, "signin-name").is_displayed(), what="the sign-in form")
        for field, value in (("signin-name", name), ("signin-password", password)):
            box = self.d.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        self.d.find_element(By.ID, "signup-button" if create else "signin-button").click()
        self.wait(lambda: self.chat_shown() or self.signin_error() not in ("", "signing in\u2026", "creating the account\u2026"),
                  what="the sign-in answer")
        return "" if self.chat_shown() else self.signin_error()

    def signin_error(self) -> str:
        return self.js("return document.getElementById('signin-error').textContent")

    def chat_shown(self) -> bool:
        return bool(self.js("return !document.getElementById('chat').hidden && document.getElementById('conn').textContent === 'connected'"))

    def type(self, text: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        box = self.d.find_element(By.ID, "input")
        for i, line in enumerate(text.split("\n")):
            if i:
                box.send_keys(Keys.SHIFT, Keys.ENTER)  # a new line within the message
            box.send_keys(line)
        box.send_keys(Keys.ENTER)

    def keys(self, *keys: str) -> None:
        """Press keys wherever the focus is (keyboard-only use)."""
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.d).send_keys(*keys).perform()

    def chord(self, modifier: str, key: str) -> None:
        """Hold ``modifier`` (Keys.ALT, ...) while pressing ``key``."""
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.d).key_down(modifier).send_keys(key).key_up(modifier).perform()

    def focused(self) -> str:
        return self.js("return document.activeElement.id || document.activeElement.tagName")

    def lines(self) -> list[dict]:
        return self.js(LINES_JS)

    def texts(self) -> list[str]:
        return [ln["text"] for ln in self.lines() if "kind-text" in ln["kind"] or "kind-me" in ln["kind"]]

    def notes(self) -> list[str]:
        try:
            return self.js("return Array.from(document.querySelectorAll('#log li.note')).map(n => n.textContent)")
        except WebDriverException:  # the page is not there
            return []

    def pending(self) -> int:
        return self.js("return document.querySelectorAll('#outbox li').length")

    def switch(self, label: str) -> None:
        from selenium.webdriver.common.by import By

        def find():  # type: ignore[no-untyped-def]
            for b in self.d.find_elements(By.CSS_SELECTOR, "button.room"):
                if b.find_element(By.CSS_SELECTOR, ".name").text == label:
                    return b
            return None

        self.wait(find, what=f"the room {label}").click()
        self.wait(lambda: self.js("return document.getElementById('room-title').textContent") == label, what=f"{label} shown")

    def indicator(self) -> str:
        return self.js("return document.getElementById('conn').textContent")
