#!/usr/bin/env python3
"""Make docs/web-screenshot.png: the web chat with three users, from a real browser.

Starts a private broker and `zchat web` (temporary directories, free loopback ports),
signs alice and bob up in two headless Chromiums (Debian's chromium + chromium-driver;
nothing is downloaded), has carol talk from the terminal (`zchat send`), and saves what
alice's browser shows. Everything it started is stopped by PID at the end.

    PYTHONPATH=. python scripts/screenshot_web.py [--out docs/web-screenshot.png]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"


def free_base(count: int) -> int:
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise SystemExit("no free ports")


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited: {proc.stdout.read() if proc.stdout else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling interval
    raise SystemExit(f"{what} did not listen on {port}")


def until(predicate, what: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)  # polling interval
    raise SystemExit(f"timed out waiting for {what}")


def chrome(width: int, height: int):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-dev-shm-usage", f"--window-size={width},{height}", "--lang=en-US", "--hide-scrollbars"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def sign_up(driver, url: str, name: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    until(lambda: driver.find_element(By.ID, "signin-name").is_displayed(), "the sign-in form")
    driver.find_element(By.ID, "signin-name").send_keys(name)
    driver.find_element(By.ID, "signin-password").send_keys(PASSWORD)
    driver.find_element(By.ID, "signup-button").click()
    until(lambda: driver.execute_script("return document.getElementById('conn').textContent") == "connected", f"{name} connected")


def say(driver, text: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "input")
    for i, line in enumerate(text.split("\n")):
        if i:
            box.send_keys(Keys.SHIFT, Keys.ENTER)  # a new line in the same message
        box.send_keys(line)
    box.send_keys(Keys.ENTER)
    until(lambda: driver.execute_script("return document.querySelectorAll('#outbox li').length") == 0, "the line stored")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "web-screenshot.png"))
    ap.add_argument("--width", type=int, default=1100)
    ap.add_argument("--height", type=int, default=700)
    args = ap.parse_args()
    procs: list[subprocess.Popen] = []
    drivers: list = []
    with tempfile.TemporaryDirectory(prefix="zchat-shot-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZCHAT_")}
        env.update(ZCHAT_CONFIG_DIR=f"{tmp}/config", ZCHAT_DATA_DIR=f"{tmp}/data", PYTHONPATH=str(ROOT))
        base = free_base(4)
        broker = f"tcp://127.0.0.1:{base}"
        web_port = free_base(1)
        url = f"http://127.0.0.1:{web_port}"
        zchat = [sys.executable, "-m", "zchat"]
        try:
            procs.append(subprocess.Popen([*zchat, "broker", "--bind", broker, "--db", f"{tmp}/history.db"], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            wait_port(base + 2, procs[-1], "the broker")
            procs.append(subprocess.Popen([*zchat, "web", "--listen", f"127.0.0.1:{web_port}", "--broker", broker], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            wait_port(web_port, procs[-1], "zchat web")

            def carol(*args: str) -> None:
                subprocess.run([*zchat, *args, "--name", "carol", "--broker", broker], env=env, check=True, capture_output=True, timeout=30)

            alice, bob = chrome(args.width, args.height), chrome(args.width, args.height)
            drivers += [alice, bob]
            sign_up(alice, url, "alice")
            sign_up(bob, url, "bob")
            say(alice, "/join dev")
            until(lambda: alice.execute_script("return document.getElementById('room-title').textContent") == "#dev", "#dev")
            alice.execute_script("switchTo('general')")
            say(alice, "morning! the release notes are up for review")
            say(bob, "thanks alice, reading them now")
            carol("send", "--room", "general", "I'm on the terminal today: zchat talk, same room")
            say(bob, "/me waves at carol")
            say(alice, "nice, the web and the terminal in one chat\nShift-Enter makes a second line")
            carol("send", "--room", "dev", "alice: the build is green on main")
            carol("send", "--to", "alice", "lunch at one?")
            until(lambda: alice.execute_script("return document.querySelectorAll('#dm-list button').length") == 1, "the DM listed")
            until(lambda: len(alice.execute_script("return document.querySelectorAll('#log li.msg')")) >= 7, "the lines at alice")
            until(lambda: alice.execute_script("return document.querySelectorAll('#member-list li').length") >= 3, "three members")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            alice.save_screenshot(args.out)
            print(f"wrote {args.out}")
        finally:
            for d in drivers:
                d.quit()
            for proc in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
