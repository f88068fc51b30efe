"""The web gateway's HTTP face (aiohttp): the page, sign-in, and the WebSocket.

Routes:

* ``GET /`` the page, ``GET /static/...`` its script and style (shipped in the package);
* ``POST /api/signup`` {name, password, invite?}: make an account and claim the name at
  the broker; ``POST /api/signin`` {name, password}; ``POST /api/signout``;
  ``GET /api/me``: who this cookie signs in, for the page to choose its first screen;
* ``GET /ws``: the WebSocket of one tab (zchat.web.wire).

Every request that acts (the POSTs, the WebSocket) must come with an ``Origin`` that is
the gateway's own (or one given with ``origins``): a page of another site cannot make a
browser sign in, sign out or chat here, even where SameSite cookies are not honoured.
Sign-in and sign-up are rate limited per name and per source address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
from pathlib import Path

import zmq
from aiohttp import WSMsgType, web

from zchat.accounts import AccountError, Accounts, SignInLimiter
from zchat.client import AuthError, BrokerKeyError, ConnectError
from zchat.web import wire
from zchat.web.hub import Gateway, GatewayFull
from zchat.web.sessions import COOKIE, Sessions, cookie_flags
from zchat.web.tab import QUEUE_BYTES, Tab

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
WRONG = "wrong name or password"
#: Requests (join, part, who, history) one tab may have waiting for the broker at once.
MAX_REQUESTS = 16
#: Password hashes computed at once.
HASHING_THREADS = 2
#: The page's own headers: scripts, styles and sockets from this origin only, no
#: framing (clickjacking), no sniffing; a second line behind rendering user text as text.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

GATEWAY = web.AppKey("gateway", Gateway)
CONFIG = web.AppKey("config", dict)


class WebConfig:
    """What ``make_app`` needs besides the gateway (the CLI fills it from flags)."""

    def __init__(
        self, data_dir: Path, *, origins: tuple[str, ...] = (), secure_cookies: bool = False, trust_proxy: bool = False,
        tab_queue_bytes: int = QUEUE_BYTES, sign_in_per_minute: float = 10.0,
    ) -> None:
        self.accounts = Accounts(data_dir)
        self.sessions = Sessions()
        self.origins = origins
        self.secure_cookies = secure_cookies
        self.trust_proxy = trust_proxy
        self.tab_queue_bytes = tab_queue_bytes
        # 0: no limit (a benchmark signing hundreds of users up from one address)
        self.limiter = SignInLimiter(per_minute=sign_in_per_minute) if sign_in_per_minute > 0 else None


class Web:
    """The handlers, over one Gateway and one WebConfig."""

    def __init__(self, gateway: Gateway, config: WebConfig) -> None:
        self.gateway = gateway
        self.config = config
        # scrypt takes 16 MiB and tens of ms a hash: two at a time bound both the memory
        # (each thread's malloc arena keeps what it had) and the CPU a flood of sign-ins gets.
        self._hashing = concurrent.futures.ThreadPoolExecutor(max_workers=HASHING_THREADS, thread_name_prefix="scrypt")

    async def _hash(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._hashing, fn, *args)

    # ------------------------------------------------------------ checks

    def origin_ok(self, request: web.Request) -> bool:
        """The request's Origin is this gateway's (scheme and host as the browser saw them)
        or one of ``origins`` (behind a proxy that changes the Host)."""
        origin = request.headers.get("Origin")
        if not origin:
            return False
        if origin in self.config.origins:
            return True
        return not self.config.origins and origin == f"{request.scheme}://{request.host}"

    def address(self, request: web.Request) -> str:
        """The client's address: the peer, or (behind a trusted proxy) the last hop the
        proxy wrote into X-Forwarded-For."""
        if self.config.trust_proxy:
            forwarded = request.headers.get("X-Forwarded-For", "")
            if forwarded:
                return forwarded.split(",")[-1].strip()
        return request.remote or "?"

    def session(self, request: web.Request):  # type: ignore[no-untyped-def]
        return self.config.sessions.get(request.cookies.get(COOKIE))

    # ------------------------------------------------------------ pages

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    async def me(self, request: web.Request) -> web.Response:
        session = self.session(request)
        if session is None:
            return web.json_response({"error": "signed out"}, status=401)
        return web.json_response({"name": session.name})

    # ------------------------------------------------------------ sign-in

    async def _credentials(self, request: web.Request) -> tuple[str, str, str] | web.Response:
        if not self.origin_ok(request):
            return web.json_response({"error": "this request must come from the chat's own page"}, status=403)
        try:
            body = await request.json()
            name, password = body["name"], body["password"]
            invite = body.get("invite", "") or ""
            if not all(isinstance(v, str) for v in (name, password, invite)):
                raise TypeError("not text")
        except (ValueError, KeyError, TypeError, AttributeError):
            return web.json_response({"error": "send JSON with name and password"}, status=400)
        limiter = self.config.limiter
        wait = limiter.allow(name[:64], self.address(request)) if limiter is not None else 0.0
        if wait:
            return web.json_response({"error": f"too many attempts: try again in {wait:.0f} s", "retry_after": wait}, status=429)
        return name, password, invite

    def _signed_in(self, name: str) -> web.Response:
        token, _ = self.config.sessions.create(name)
        resp = web.json_response({"name": name})
        resp.set_cookie(COOKIE, token, **cookie_flags(self.config.secure_cookies))  # type: ignore[arg-type]
        return resp

    async def _start(self, name: str, invite: str = "") -> web.Response | None:
        """Connect the user's client; a response when that failed."""
        account = self.config.accounts.get(name)
        assert account is not None
        try:
            await self.gateway.user(account, invite)
        except GatewayFull as exc:
            return web.json_response({"error": str(exc)}, status=503)
        except AuthError:
            return web.json_response({"error": f"the name {name!r} is taken at the broker (or reserved, or it needs an invite)"}, status=409)
        except (ConnectError, BrokerKeyError) as exc:
            return web.json_response({"error": f"the chat server is not reachable: {exc.message}"}, status=503)
        except (zmq.ZMQError, OSError) as exc:  # out of sockets or descriptors: say so, keep serving the others
            log.error("could not connect %s to the broker: %s", name, exc)
            return web.json_response({"error": f"the gateway cannot open another connection now ({exc}): try again later"}, status=503)
        return None

    async def signin(self, request: web.Request) -> web.Response:
        got = await self._credentials(request)
        if isinstance(got, web.Response):
            return got
        name, password, _ = got
        if not await self._hash(self.config.accounts.verify, name, password):
            log.info("refused a sign-in as %r from %s", name[:64], self.address(request))
            return web.json_response({"error": WRONG}, status=401)
        return await self._start(name) or self._signed_in(name)

    async def signup(self, request: web.Request) -> web.Response:
        got = await self._credentials(request)
        if isinstance(got, web.Response):
            return got
        name, password, invite = got
        try:
            await self._hash(self.config.accounts.create, name, password)
        except AccountError as exc:
            status = 409 if exc.code == AccountError.TAKEN else 400
            msg = f"the name {name!r} is taken" if exc.code == AccountError.TAKEN else str(exc)
            return web.json_response({"error": msg}, status=status)
        failed = await self._start(name, invite)
        if failed is not None:  # the broker did not give us the name: no account either
            self.config.accounts.remove(name)
            return failed
        return self._signed_in(name)

    async def signout(self, request: web.Request) -> web.Response:
        if not self.origin_ok(request):
            return web.json_response({"error": "this request must come from the chat's own page"}, status=403)
        session = self.config.sessions.end(request.cookies.get(COOKIE))
        if session is not None and (hub := self.gateway.users.get(session.name)) is not None:
            hub.sign_out(session.key)
        resp = web.json_response({"ok": True})
        resp.del_cookie(COOKIE, path="/")
        return resp

    # ------------------------------------------------------------ the WebSocket

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if not self.origin_ok(request):
            log.info("refused a WebSocket from origin %r", request.headers.get("Origin"))
            return web.json_response({"error": "wrong origin"}, status=403)
        session = self.session(request)
        if session is None:
            return web.json_response({"error": "signed out"}, status=401)
        account = self.config.accounts.get(session.name)
        if account is None:
            return web.json_response({"error": "no such account"}, status=401)
        # No permessage-deflate: chat frames are small, and zlib cost a quarter of the
        # gateway's CPU and a deflate state per tab (measured with zchat bench --gateway).
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=wire.MAX_FRAME, compress=False)
        await ws.prepare(request)
        tab = Tab(ws, session.key, self.config.tab_queue_bytes, request.transport)
        hub = None
        try:
            first = await ws.receive(timeout=30.0)
            hello = wire.decode(first.data) if first.type == WSMsgType.TEXT else None
            if not isinstance(hello, wire.Hello):
                raise wire.FrameError("the first frame must be hello")
            try:
                hub = await self.gateway.user(account)
            except (GatewayFull, AuthError, ConnectError, zmq.ZMQError, OSError) as exc:
                tab.push(wire.frame("error", code="unavailable", message=str(exc)))
                await ws.close(code=1013, message=b"try again later")
                return ws
            hub.attach(tab, hello)
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                try:
                    req = wire.decode(frame.data)
                except wire.FrameError as exc:
                    tab.push(wire.frame("error", code="bad_frame", message=str(exc)))
                    continue
                if isinstance(req, wire.Send):
                    await hub.handle(tab, req)  # at once, in order: it only posts
                elif tab.requests >= MAX_REQUESTS:
                    tab.push(wire.frame("error", code="limit_reached", message=f"{MAX_REQUESTS} requests of this tab are still running"))
                else:  # a join or history waits for the broker: keep reading meanwhile
                    hub.spawn_request(tab, req)
        except wire.FrameError as exc:
            tab.push(wire.frame("error", code="bad_frame", message=str(exc)))
            await ws.close(code=1008, message=b"bad frame")
        except TimeoutError:
            await ws.close(code=1008, message=b"no hello")
        finally:
            if hub is not None:
                hub.detach(tab)
            await tab.finish()
        return ws


@web.middleware
async def _headers(request: web.Request, handler):  # type: ignore[no-untyped-def]
    resp = await handler(request)
    if not resp.prepared:
        for key, value in SECURITY_HEADERS.items():
            resp.headers.setdefault(key, value)
    return resp


def make_app(gateway: Gateway, config: WebConfig) -> web.Application:
    """The aiohttp application; the gateway's clients close with it."""
    handlers = Web(gateway, config)
    app = web.Application(middlewares=[_headers], client_max_size=64 * 1024)
    app[GATEWAY] = gateway
    app.add_routes([
        web.get("/", handlers.index),
        web.get("/api/me", handlers.me),
        web.post("/api/signin", handlers.signin),
        web.post("/api/signup", handlers.signup),
        web.post("/api/signout", handlers.signout),
        web.get("/ws", handlers.websocket),
        web.static("/static", STATIC),
    ])

    async def closing(app: web.Application) -> None:
        await gateway.close()
        handlers._hashing.shutdown(wait=False)

    app.on_shutdown.append(closing)
    return app


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context from PEM files (TLS 1.2 at least)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
