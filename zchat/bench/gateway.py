"""``zchat bench --gateway``: browser users through ``zchat web`` beside direct zchat clients.

One run, one broker (``servers.start_zchat``, CURVE), one ``zchat web`` process:

- N web users sign up over HTTP and each opens one WebSocket (the ``websockets`` client
  library, no browsers), all in ``#general``, read by this process;
- N direct zchat clients join ``#general`` in a child process of their own;
- one more direct client posts ``--lines`` lines at ``--rate`` a second, each stamped with
  ``time.monotonic()`` (shared by every process on Linux: see zchat.bench.common).

Every user notes each line's delay from its send to its arrival. Printed: delivered and
expected, latency p50/p99 for each kind of user, and the gateway's RSS before the users,
after their sign-ups (a Client each) and with their tabs open, per user and per 100
users; also its CPU time. Targets (issue 16): web p99 within 2x of direct clients, under
50 MB of gateway memory per 100 users. Figures, not assertions: the machine decides them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from zchat.bench import common, procs, servers
from zchat.bench.scenarios import percentile

ROOM = "general"  # where the gateway puts a new user
PASSWORD = "bench password 0123"
MARK = "00|"  # the sender's lines (common.text(0, n))
EVENTS = b'{"t":"events",'  # how the gateway's live frames begin (zchat.web.wire.joined)
LINE = b'"text":"' + MARK.encode()  # a line of the sender's in one (its text needs no escape)
#: Before the measured lines: one line every user must have (so the set-up's wake is
#: over: 1,000 users' joins are about a million join and presence deliveries, in the
#: room's order before it), then seconds of unmeasured lines at the run's rate. Measured
#: from the start, the first seconds' lines carried that wake (the sender's loop held
#: 0.2-2.3 s) and, as the p99 of 500 users' deliveries is the run's worst two lines, set
#: it (docs/web.md, session 5).
WARM_UP_SECONDS = 2.0
WARM = "zchat-bench-warm-up"
WARM_BYTES = WARM.encode()


def warm_up_lines(rate: float) -> int:
    return max(1, round(WARM_UP_SECONDS * rate))


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="zchat bench --gateway", description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=500, help="web users, and as many direct clients [500]")
    ap.add_argument("--lines", type=int, default=200, help="lines the sender posts [200]")
    ap.add_argument("--rate", type=float, default=20.0, help="lines a second [20]")
    ap.add_argument("--reader", choices=("sans-io", "asyncio"), default="sans-io",
                    help="the tabs' reader: websockets' sans-I/O protocol in asyncio callbacks, or its asyncio client (a task per tab) [sans-io]")
    ap.add_argument("--quick", action="store_true", help="100 users, 100 lines")
    ap.add_argument("--out", help="write the figures as JSON here too")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.users, args.lines = 100, 100
    return args


# ------------------------------------------------------------------ direct clients (child process)


def _direct(address: str, n: int, lines: int, rate: float, conn: Any) -> None:
    """N direct receivers and the sender, in one process; reports their delays on ``conn``."""
    procs.raise_nofile()
    asyncio.run(_direct_main(address, n, lines, rate, conn))


async def _direct_main(address: str, n: int, lines: int, rate: float, conn: Any) -> None:
    import zmq.asyncio

    from zchat.client import Client

    zmq.asyncio.Context.instance().max_sockets = n * 8 + 64

    delays: list[float] = []
    got = [0] * n
    warm = [0] * n
    clients: list[Client] = []

    def listener(i: int):  # type: ignore[no-untyped-def]
        def take(batch: list) -> None:
            t = common.now()
            for ev in batch:
                text = getattr(ev, "text", "")
                if text.startswith(MARK):
                    delays.append(t - common.stamp(text))
                    got[i] += 1
                elif text.startswith(WARM):
                    warm[i] += 1
        return take

    sem = asyncio.Semaphore(16)

    async def one(i: int) -> Client:
        async with sem:
            c = Client(address, f"direct{i}", f"bench-direct-secret-{i:06d}", label="bench")
            await c.connect(timeout=60)
            await c.join(ROOM)
            c.listen(listener(i))
            return c

    clients = list(await asyncio.gather(*(one(i) for i in range(n))))
    sender = Client(address, "sender", "bench-sender-secret-000000", label="bench")
    await sender.connect(timeout=60)
    await sender.join(ROOM)
    conn.send("ready")
    conn.recv()  # "go"
    # Set-up objects (500 clients' sockets, trackers, tasks) out of the cyclic GC's full
    # scans, as in the other benchmarks' peers; here it stands for 500 small processes.
    # The gateway does the same of itself (zchat.web.collector), the tabs' reader too.
    gc.freeze()
    await sender.send(ROOM, f"{WARM} first")
    deadline = time.monotonic() + 120
    while min(warm) < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # polling until every receiver has the first warm-up line
    conn.send("warm")
    conn.recv()  # "on": the tabs have it too
    cpu0 = time.process_time()
    start = time.monotonic()
    futures = []
    unmeasured = warm_up_lines(rate)
    for k in range(unmeasured + lines):
        delay = start + k / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the sender, not waiting for a result
        futures.append(sender.post(ROOM, f"{WARM} {k}" if k < unmeasured else common.text(0, k - unmeasured)))
    await asyncio.gather(*futures)
    deadline = time.monotonic() + 60
    while min(got) < lines and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # polling until the receivers have it all
    conn.send({"delays": delays, "got": sum(got), "complete": sum(1 for g in got if g >= lines), "cpu_s": time.process_time() - cpu0})
    conn.recv()  # "stop": the web side is done too
    for c in [*clients, sender]:
        await c.close()


# ------------------------------------------------------------------ web users (this process)


class _Tab(asyncio.Protocol):
    """One simulated tab: the websockets library's sans-I/O client protocol on an asyncio
    transport, each frame parsed and handed to ``on_text`` in ``data_received``.

    The benchmark's 500 tabs stand for browsers on 500 machines, yet here they share the
    two cores with the gateway, the broker and the direct clients; websockets' asyncio
    connection wakes a task (and resolves a future) per frame per tab, which made the
    instrument a large part of the web latency it measures (``--reader asyncio`` keeps
    that reader, for comparison)."""

    def __init__(self, wsurl: str, origin: str, cookie: str, on_text: Any) -> None:
        from websockets.client import ClientProtocol
        from websockets.typing import Origin
        from websockets.uri import parse_uri

        self.proto = ClientProtocol(parse_uri(wsurl), origin=Origin(origin), max_size=None)
        self.cookie = cookie
        self.on_text = on_text
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        request = self.proto.connect()
        request.headers["Cookie"] = f"zchat_session={self.cookie}"
        self.proto.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Frame, Opcode
        from websockets.http11 import Response

        self.proto.receive_data(data)
        for ev in self.proto.events_received():
            if isinstance(ev, Frame):
                if ev.opcode is Opcode.TEXT:
                    self.on_text(ev.data)
            elif isinstance(ev, Response) and not self.opened.done():
                if self.proto.handshake_exc is not None:
                    self.opened.set_exception(self.proto.handshake_exc)
                else:
                    self.opened.set_result(None)
        self._flush()

    def _flush(self) -> None:
        for data in self.proto.data_to_send():
            if data:
                self.transport.write(data)  # type: ignore[union-attr]
            elif self.transport is not None and self.transport.can_write_eof():
                self.transport.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close_code = self.proto.close_rcvd.code if self.proto.close_rcvd is not None else 1006
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during the handshake: {exc}"))

    def send(self, text: str) -> None:
        self.proto.send_text(text.encode())
        self._flush()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.proto.send_close()
            self._flush()
            self.transport.close()


def stamps(frame: bytes) -> list[float]:
    """The send times of the sender's lines in a live ``events`` frame, read from its
    bytes (a quote inside a JSON string is escaped, so LINE only ever starts a text)."""
    out = []
    at = frame.find(LINE)
    while at >= 0:
        start = at + len(LINE) - len(MARK)
        out.append(common.stamp(frame[start:start + 30]))
        at = frame.find(LINE, start)
    return out


async def _web_users(url: str, n: int, lines: int, gateway_pid: int, direct: Any, reader: str = "sans-io") -> dict[str, Any]:
    """Sign N users up and open a tab for each at once (as the page does), then read."""
    import aiohttp
    import websockets

    rss: dict[str, int] = {"before": procs.rss_bytes(gateway_pid)}
    delays: list[float] = []
    got = [0] * n
    warm = [0] * n
    welcomed = [False] * n
    closes: collections.Counter = collections.Counter()
    sockets: list[Any] = []
    readers: list[asyncio.Future] = []
    wsurl = url.replace("http://", "ws://") + "/ws"

    def take(i: int, frame: str | bytes) -> None:
        if isinstance(frame, bytes) and frame.startswith(EVENTS):
            # The sender's lines found in the frame's bytes, as the direct clients' listener
            # compares a prefix: the instrument stands for 500 browsers on machines of their
            # own, so it should cost the shared cores little (json.loads of every frame for
            # every tab was most of this reader; see docs/web.md, "session 4").
            t = common.now()
            sent = stamps(frame)
            delays.extend(t - s for s in sent)
            got[i] += len(sent)
            if not warm[i]:
                warm[i] = frame.count(WARM_BYTES)
            return
        data = json.loads(frame)
        if data["t"] == "welcome":
            welcomed[i] = True
        elif data["t"] == "events":
            t = common.now()
            for item in data["items"]:
                if item["t"] == "msg" and item["text"].startswith(MARK):
                    delays.append(t - common.stamp(item["text"]))
                    got[i] += 1
                elif item["t"] == "msg" and item["text"].startswith(WARM):
                    warm[i] += 1

    async def tab(i: int, ws: Any) -> None:
        try:
            async for frame in ws:
                take(i, frame)
        except websockets.ConnectionClosed:
            pass
        closes[ws.close_code] += 1

    async def open_tab(i: int, cookie: str) -> None:
        hello = json.dumps({"t": "hello", "since": {}})
        if reader == "asyncio":
            ws = await websockets.connect(wsurl, origin=url, additional_headers={"Cookie": f"zchat_session={cookie}"}, max_size=None, open_timeout=120)
            await ws.send(hello)
            sockets.append(ws)
            readers.append(asyncio.ensure_future(tab(i, ws)))
            return
        host, port = url[len("http://"):].rsplit(":", 1)
        _, proto = await asyncio.get_running_loop().create_connection(lambda: _Tab(wsurl, url, cookie, lambda f: take(i, f)), host, int(port))
        await asyncio.wait_for(proto.opened, 120)
        proto.send(hello)
        sockets.append(proto)

    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def user(i: int) -> None:
            async with sem:
                body = {"name": f"web{i}", "password": PASSWORD}
                async with http.post(url + "/api/signup", json=body, headers={"Origin": url}) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"sign-up of web{i}: {resp.status} {await resp.text()}")
                    cookie = resp.cookies["zchat_session"].value
                await open_tab(i, cookie)

        t0 = time.monotonic()
        await asyncio.gather(*(user(i) for i in range(n)))
        signup_s = time.monotonic() - t0
    deadline = time.monotonic() + 120
    while not all(welcomed) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # polling until every tab is welcomed
    rss["users"] = procs.rss_bytes(gateway_pid)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, direct.recv)  # "ready"
    gc.freeze()  # alike for every peer (see _direct_main)
    direct.send("go")
    settle0 = time.monotonic()
    await loop.run_in_executor(None, direct.recv)  # "warm": every direct client has the first warm-up line
    deadline = time.monotonic() + 120
    while min(warm) < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # polling until every tab has it too
    settle_s = time.monotonic() - settle0
    cpu0 = procs.cpu_seconds(gateway_pid)  # (after the joins' wake: their presence is not the run's)
    own0 = time.process_time()
    print(f"bench: {n} tabs open, the lines start (profile the gateway now: py-spy record -p {gateway_pid})", file=sys.stderr, flush=True)
    direct.send("on")
    result = await loop.run_in_executor(None, direct.recv)
    deadline = time.monotonic() + 60
    while min(got) < lines and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # polling until the tabs have it all
    rss["after"] = procs.rss_bytes(gateway_pid)
    cpu = procs.cpu_seconds(gateway_pid) - cpu0
    own = time.process_time() - own0
    direct.send("stop")
    for s in sockets:
        if isinstance(s, _Tab) and s.close_code is not None:
            closes[s.close_code] += 1
    early = dict(closes)  # tabs the gateway closed during the run (ours are closed below)
    for s in sockets:
        if isinstance(s, _Tab):
            s.close()
        else:
            await s.close()
    for r in readers:
        r.cancel()
    return {
        "web_delays": delays, "web_got": sum(got), "web_complete": sum(1 for g in got if g >= lines), "closes": early,
        "direct": result, "rss": rss, "signup_s": signup_s, "settle_s": settle_s, "gateway_cpu_s": cpu, "reader": reader, "reader_cpu_s": own,
    }


# ------------------------------------------------------------------ report


def _figures(n: int, lines: int, rate: float, raw: dict[str, Any]) -> dict[str, Any]:
    def lat(values: list[float]) -> dict[str, float]:
        v = sorted(values)
        return {"p50_ms": percentile(v, 0.50) * 1000, "p99_ms": percentile(v, 0.99) * 1000, "max_ms": (v[-1] * 1000) if v else float("nan")}

    rss = raw["rss"]
    per_user = (rss["users"] - rss["before"]) / n
    return {
        "users": n, "lines": lines, "rate": rate, "reader": raw.get("reader", ""), "expected_each": n * lines,
        "warm_up_lines": warm_up_lines(rate),  # unmeasured, before the lines; in the CPU figures
        "cpu_deliveries_each": n * (lines + warm_up_lines(rate)),
        "web": {"delivered": raw["web_got"], "complete_users": raw["web_complete"], **lat(raw["web_delays"])},
        "direct": {"delivered": raw["direct"]["got"], "complete_users": raw["direct"]["complete"], **lat(raw["direct"]["delays"])},
        "web_close_codes": raw["closes"],
        "gateway_rss_mb": {k: v / 2**20 for k, v in rss.items()},
        "gateway_rss_per_user_mb": per_user / 2**20,
        "gateway_rss_per_100_users_mb": per_user * 100 / 2**20,
        "gateway_cpu_s": raw["gateway_cpu_s"],
        # the other CPU of the run: the tabs' reader (this process) and the direct clients' process
        "reader_cpu_s": raw["reader_cpu_s"],
        "direct_cpu_s": raw["direct"].get("cpu_s", float("nan")),
        "signup_s": raw["signup_s"],
        "settle_s": raw["settle_s"],  # from the set-up's end until every user had the first warm-up line
    }


def _table(f: dict[str, Any]) -> str:
    w, d = f["web"], f["direct"]
    ratio = w["p99_ms"] / d["p99_ms"] if d["p99_ms"] else float("nan")
    r = f["gateway_rss_mb"]
    return "\n".join([
        (f"gateway scenario: {f['users']} web users and {f['users']} direct clients in #{ROOM}, "
         f"{f['lines']} lines at {f['rate']:g}/s ({f['expected_each']} deliveries expected for each kind), after {f['warm_up_lines']} unmeasured; tabs read by {f['reader']}"),
        "",
        "| users | delivered | users with every line | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| web (through zchat web) | {w['delivered']} | {w['complete_users']} | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} | {w['max_ms']:.1f} |",
        f"| direct zchat clients | {d['delivered']} | {d['complete_users']} | {d['p50_ms']:.1f} | {d['p99_ms']:.1f} | {d['max_ms']:.1f} |",
        "",
        f"web p99 / direct p99: {ratio:.2f} (target: at most 2)",
        (f"gateway RSS: {r['before']:.1f} MB before, {r['users']:.1f} MB with {f['users']} users (a client and a tab each), "
         f"{r['after']:.1f} MB after the run; tabs closed by the gateway: {f['web_close_codes'] or 'none'}"),
        (f"gateway RSS per user: {f['gateway_rss_per_user_mb']:.2f} MB = {f['gateway_rss_per_100_users_mb']:.1f} MB per 100 users "
         f"(target: under 50); sign-ups took {f['signup_s']:.1f} s, and the room settled (every user had the joins' "
         f"wake and a first line) {f['settle_s']:.1f} s later"),
        (f"CPU during the run: gateway {f['gateway_cpu_s']:.2f} s ({f['gateway_cpu_s'] / f['cpu_deliveries_each'] * 1e6:.0f} µs a delivery), "
         f"direct clients {f['direct_cpu_s']:.2f} s ({f['direct_cpu_s'] / f['cpu_deliveries_each'] * 1e6:.0f} µs a delivery), "
         f"the benchmark's tab reader {f['reader_cpu_s']:.2f} s"),
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    procs.raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="zchat-bench-gateway-"))
    broker = web = child = None
    try:
        broker = servers.start_zchat(tmp, heartbeat=10.0)
        address = broker.endpoints["broker"]
        port = procs.free_port_base(1)
        url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZCHAT_") or k == servers.PLAINTEXT_ENV}
        env.update(ZCHAT_CONFIG_DIR=str(tmp / "web-config"), ZCHAT_DATA_DIR=str(tmp / "web-data"))
        if servers.bench_plaintext():
            env["ZCHAT_INSECURE_PLAINTEXT_ENDPOINTS"] = os.environ.get("ZCHAT_INSECURE_PLAINTEXT_ENDPOINTS", "")
        log = open(tmp / "web.log", "w")  # noqa: SIM115 (closed with the process)
        web = procs.popen(
            [sys.executable, "-m", "zchat", "web", "--listen", f"127.0.0.1:{port}", "--broker", address, "--data-dir", str(tmp / "web"),
             "--max-users", str(args.users + 10), "--sign-in-per-minute", "0", "--log-level", "WARNING"],
            env=env, stdout=log, stderr=log,
        )
        procs.wait_listening(port, web, timeout=60)
        print(f"bench: gateway {web.pid} on {url}, broker {broker.pid}; {args.users} web users + {args.users} direct clients",
              file=sys.stderr)
        parent, child_end = procs.mp().Pipe()
        child = procs.spawn(_direct, address, args.users, args.lines, args.rate, child_end, log=str(tmp / "direct.log"), name="bench-direct")
        raw = asyncio.run(_web_users(url, args.users, args.lines, web.pid, parent, args.reader))
        figures = _figures(args.users, args.lines, args.rate, raw)
        print(_table(figures))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(figures, indent=1))
        return 0
    finally:
        for proc in (child, web):
            if proc is not None:
                procs.stop(proc, grace=5.0)
        if broker is not None:
            broker.stop()
        if args.keep:
            print(f"bench: kept {tmp}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
