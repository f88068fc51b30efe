"""A real web gateway on 127.0.0.1 in front of a real broker (tests/conftest.py), and
browser-less users of it: an aiohttp session each (its own cookies) and WebSocket tabs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import RunningBroker
from zchat.web import Gateway, WebConfig, make_app

PASSWORD = "correct horse battery"


class RunningWeb:
    def __init__(self, broker: RunningBroker, data: Path, **config: object) -> None:
        self.broker = broker
        self.data = data
        self.config_kwargs = config
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, idle_close: float = 60.0, **gateway: object) -> RunningWeb:
        self.gateway = Gateway(self.broker.endpoint, idle_close=idle_close, **gateway)  # type: ignore[arg-type]
        self.config = WebConfig(self.data, **self.config_kwargs)  # type: ignore[arg-type]
        self.app = make_app(self.gateway, self.config)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class Tab:
    """A browser-less tab: every frame it got, decoded, in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict] = []
        self.closed_with: int | None = None
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.frames.append(json.loads(msg.data))
        self.closed_with = self.ws.close_code

    async def send(self, **frame: object) -> None:
        await self.ws.send_str(json.dumps(frame))

    def messages(self, room: str) -> list[dict]:
        """Every message of ``room`` this tab was sent (live, replayed, older), in arrival order."""
        out: list[dict] = []
        for f in self.frames:
            if f["t"] in ("replay", "older") and f["room"] == room:
                out += f["items"]
            elif f["t"] == "events":
                out += [i for i in f["items"] if i["t"] == "msg" and i["room"] == room]
        return out

    def texts(self, room: str) -> list[str]:
        return [m["text"] for m in sorted(self.messages(room), key=lambda m: m["seq"]) if m["kind"] in ("text", "me")]

    def of(self, t: str) -> list[dict]:
        return [f for f in self.frames if f["t"] == t]

    async def until(self, predicate: Callable[[Tab], object], timeout: float = 15.0, what: str = "a frame") -> object:
        deadline = time.monotonic() + timeout
        while True:
            got = predicate(self)
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; frames: {self.frames[-8:]}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


class User:
    """One browser user: its own cookie jar; ``tab()`` opens a WebSocket like the page."""

    def __init__(self, site: RunningWeb, name: str) -> None:
        self.site = site
        self.name = name
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.tabs: list[Tab] = []

    @property
    def origin(self) -> str:
        return self.site.url

    async def post(self, path: str, origin: str | None = None, **body: object) -> tuple[int, dict]:
        headers = {"Origin": origin or self.origin}
        async with self.http.post(self.site.url + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    async def signup(self, password: str = PASSWORD, **extra: object) -> tuple[int, dict]:
        return await self.post("/api/signup", name=self.name, password=password, **extra)

    async def signin(self, password: str = PASSWORD) -> tuple[int, dict]:
        return await self.post("/api/signin", name=self.name, password=password)

    async def tab(self, since: dict | None = None, origin: str | None = None, hello: bool = True) -> Tab:
        ws = await self.http.ws_connect(self.site.url + "/ws", headers={"Origin": origin or self.origin})
        tab = Tab(ws)
        self.tabs.append(tab)
        if hello:
            await tab.send(t="hello", since=since or {})
            await tab.until(lambda t: t.of("welcome"), what="welcome")
        return tab

    async def close(self) -> None:
        for tab in self.tabs:
            await tab.close()
        await self.http.close()


@pytest.fixture
async def site(broker: RunningBroker, tmp_path: Path) -> AsyncIterator[RunningWeb]:
    running = await RunningWeb(broker, tmp_path / "web").start()
    yield running
    await running.stop()


@pytest.fixture
async def users(site: RunningWeb) -> AsyncIterator[Callable[[str], User]]:
    made: list[User] = []

    def make(name: str) -> User:
        user = User(site, name)
        made.append(user)
        return user

    yield make
    for user in made:
        await user.close()


def since_of(tab: Tab) -> dict:
    """What a page would say in hello after holding what ``tab`` got: room -> [epoch, last seq]."""
    out: dict = {}
    epochs = {r["room"]: r["epoch"] for w in tab.of("welcome") for r in w["rooms"]}
    for f in tab.of("reset") + tab.of("replay"):
        epochs[f["room"]] = f["epoch"]
    for room, epoch in epochs.items():
        seqs = [m["seq"] for m in tab.messages(room)]
        out[room] = [epoch, max(seqs, default=0)]
    return out
