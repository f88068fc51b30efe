"""The broker process: a thin asyncio shell around zchat.core.

One task owns every socket. It waits on a poller, drains whatever is ready without
blocking (so one client can never stall the others), feeds the core, then carries
out the core's Outcome: store (one transaction per batch), publish, reply.

Sockets (all PLAIN-authenticated through the ZAP handler below):
  ROUTER  port P    requests and replies, acks and errors for chat lines
  PULL    port P+1  chat lines from the clients' PUSH
  XPUB    port P+2  fan-out; XPUB_MANUAL so each subscription is authorised
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from typing import Any

import msgspec
import zmq

from zchat import __version__, auth
from zchat.sockio import NOBLOCK, readable, recv_frames, recv_parts, send_parts
from zchat import protocol as p
from zchat.core import Core, HistoryQuery, Limits, Outcome
from zchat.guard import Claims, ConnectionGuard, GuardConfig, connection_cap, raise_fd_limit
from zchat.retention import Retention, RetentionPolicy
from zchat.storage import Storage, StorageError, StorageUnavailable

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zchat"
BATCH = 128  # most messages taken from one socket per loop turn: bounds a turn, so the wait of everyone else
#: A Batch publication grows to about this many bytes at most (text counted as bytes
#: per character: a bound, not a measure): 256 KiB, so the per-subscriber queue of
#: pub_hwm publications holds at most pub_hwm * 320 KiB or so.
MAX_PUBLICATION_BYTES = 256 * 1024


class RateLimitedLog:
    """Logs bad input at most once a second per kind, with how many were suppressed."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def warn(self, kind: str, detail: str, now: float) -> None:
        if now - self.last.get(kind, 0.0) < 1.0:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return
        extra = self.suppressed.pop(kind, 0)
        self.last[kind] = now
        log.warning("bad input (%s): %s%s", kind, detail, f" (+{extra} more suppressed)" if extra else "")


class StorageOutage:
    """Tracks a store that cannot take writes (disk full, read-only, server gone): logs it
    at most once a second with how many batches were refused meanwhile, and once when
    writes succeed again. The broker needs no action to recover: every batch tries."""

    def __init__(self) -> None:
        self.since = 0.0  # monotonic time of the first refusal; 0: storage is fine
        self.last_log = 0.0
        self.refused = 0  # batches refused since the last log line
        self.total = 0  # lines refused over the outage

    def failed(self, exc: Exception, lines: int, now: float) -> None:
        if not self.since:
            self.since = now
        self.refused += 1
        self.total += lines
        if now - self.last_log >= 1.0:
            log.error(
                "storage unavailable, refusing sends with storage_unavailable (reads go on): %s "
                "(%d batch(es) refused since the last report, %d lines in %.0fs)",
                exc, self.refused, self.total, now - self.since,
            )
            self.last_log, self.refused = now, 0

    def stored(self, now: float) -> None:
        if self.since:
            log.warning("storage writable again after %.1fs; %d lines were refused meanwhile", now - self.since, self.total)
            self.since, self.refused, self.total, self.last_log = 0.0, 0, 0, 0.0


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (``tcp://host``, port); port 0 means pick free ports."""
    base, _, port = endpoint.rpartition(":")
    if not endpoint.startswith("tcp://") or not port.isdigit():
        raise ValueError(f"endpoint must look like tcp://HOST:PORT, got {endpoint!r}")
    return base, int(port)


class Broker:
    def __init__(
        self, bind: str, storage: Storage, limits: Limits = Limits(), tick: float | None = None,
        guard: GuardConfig | None = None,
    ) -> None:
        self.bind = bind
        self.storage = storage
        self.limits = limits
        self.tick_every = tick if tick is not None else min(1.0, limits.heartbeat / 2)
        self.ctx = zmq.Context()  # plain sockets: the loop watches their FDs itself
        self.core: Core | None = None
        self.endpoint = ""
        self.ports: tuple[int, int, int] = (0, 0, 0)
        self.digests: dict[str, bytes] = {}
        self.bad = RateLimitedLog()
        self.outage = StorageOutage()
        self.stopping = asyncio.Event()
        self.stopped = asyncio.Event()
        self._wake: asyncio.Future | None = None
        self.guard_config = guard or GuardConfig()
        self.reserved = frozenset(self.guard_config.reserved)
        self.claims = Claims(self.guard_config.claims_per_minute, self.guard_config.claim_timeout)
        self.guard: ConnectionGuard | None = None

    # ------------------------------------------------------------ set-up

    def _socket(self, kind: int, **options: Any) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name.upper()), value)
        return sock

    async def start(self) -> None:
        """Open storage and bind; on failure release whatever was opened, then raise."""
        try:
            await self._start()
        except BaseException:
            if self.guard is not None and self.guard._thread is None:  # its thread closes them itself
                for _, monitor in self.guard.monitors:
                    monitor.close(linger=0)
            for sock in (getattr(self, name, None) for name in ("router", "pull", "xpub", "zap")):
                if sock is not None:
                    sock.close(linger=0)
            self.ctx.term()
            await self.storage.close()
            raise

    async def _start(self) -> None:
        epoch = await self.storage.open()
        heads = await self.storage.heads()
        members = await self.storage.members()
        users = await self.storage.users()
        recent = await self.storage.recent(10_000)
        soft, _hard = raise_fd_limit()
        g = self.guard_config
        self.guard = ConnectionGuard(self.ctx, g, connection_cap(g, soft))
        self.zap = self._socket(zmq.REP)
        self.zap.bind(ZAP_ENDPOINT)
        # The socket limit is twice the body limit: a body a little too big gets a clear
        # too_large error; a frame beyond twice the limit costs its sender the connection.
        maxmsgsize = 2 * self.limits.max_bytes
        rcvhwm = g.rcvhwm(maxmsgsize)
        # ZMTP heartbeats end a connection whose peer stopped answering (a half-open TCP
        # connection would otherwise hold its descriptor and routing id for many minutes),
        # and a handshake must finish within handshake_timeout. No heartbeat_ttl: the
        # client's side should not drop and redial first, as its new connection would
        # find its routing id still held by the old pipe here (libzmq then ignores it).
        beat_ms = max(100, int(self.limits.heartbeat * 1000))
        secure = dict(
            plain_server=1, zap_domain=ZAP_DOMAIN, maxmsgsize=maxmsgsize, rcvhwm=rcvhwm,
            handshake_ivl=max(100, int(g.handshake_timeout * 1000)),
            heartbeat_ivl=beat_ms, heartbeat_timeout=3 * beat_ms,
        )
        # No router_handover: a connection that presents a routing id already in use is
        # ignored by libzmq rather than given that session's route (a takeover).
        self.router = self._socket(zmq.ROUTER, router_handover=0, sndhwm=g.router_sndhwm(), **secure)
        self.pull = self._socket(zmq.PULL, **secure)
        self.xpub = self._socket(zmq.XPUB, xpub_manual=1, sndhwm=g.xpub_sndhwm(self.limits.pub_hwm, MAX_PUBLICATION_BYTES), **secure)
        for label, sock in (("requests", self.router), ("chat", self.pull), ("fan-out", self.xpub)):
            self.guard.watch(label, sock)
        self.guard.start()
        log.info(
            "edge: %d connections from one address a port, %d in all; queues: rcvhwm %d (%d KiB a connection), "
            "ROUTER sndhwm %d, XPUB sndhwm %d; %d new names an address a minute; reserved %s",
            g.max_per_address, self.guard.total_cap, rcvhwm, rcvhwm * maxmsgsize // 1024, g.router_sndhwm(),
            g.xpub_sndhwm(self.limits.pub_hwm, MAX_PUBLICATION_BYTES), g.claims_per_minute, ",".join(sorted(self.reserved)) or "none",
        )
        base, port = split_endpoint(self.bind)
        ports = []
        for offset, sock in enumerate((self.router, self.pull, self.xpub)):
            if port:
                sock.bind(f"{base}:{port + offset}")
                ports.append(port + offset)
            else:
                sock.bind(f"{base}:*")
                ports.append(int(sock.last_endpoint.decode().rpartition(":")[2]))
        self.ports = (ports[0], ports[1], ports[2])
        self.endpoint = f"{base}:{ports[0]}"
        limits = Limits(**{**self.limits.__dict__, "pull_port": ports[1], "pub_port": ports[2]})
        self.core = Core(
            epoch=epoch, boot=secrets.token_hex(6), limits=limits, heads=heads, members=members, users=users,
            recent=recent, id_prefix=secrets.token_hex(4) + "-", wall_offset=time.time() - time.monotonic(),
        )
        lim = self.core.limits
        log.info(
            "limits: %g lines/s per user (burst %g), %g lines/s per room, %g requests/s per user (burst %g), "
            "max_rooms %d per user, %d-byte messages",
            lim.rate, lim.burst, lim.room_rate, lim.request_rate, lim.request_burst, lim.max_rooms, lim.max_bytes,
        )
        log.info(
            "zchat %s broker up: requests %s, chat in %s:%d, fan-out %s:%d, epoch %s, pid %d",
            __version__, self.endpoint, base, ports[1], base, ports[2], epoch, os.getpid(),
        )

    async def _expire_claims(self, now: float) -> None:
        """Free names claimed more than claim_timeout ago by a handshake that never said
        hello (call once a tick). A name whose owner said hello, joined or sent is kept."""
        core = self.core
        if core is None:
            return
        for name, digest in self.claims.due(now):
            if name in core.devices or name in core.rooms_of or name in core.dedup.by_user:
                continue
            try:
                released = await self.storage.release_user(name, digest)
            except StorageError as exc:
                log.warning("could not release the unused name %r: %s", name, exc)
                continue
            if released:
                core.release_user(name)
                if self.digests.get(name) == digest:
                    del self.digests[name]
                log.info("name %r released: its handshake said no hello within %.0fs", name, self.claims.timeout)

    # ------------------------------------------------------------ main loop

    async def run(self) -> None:
        """Serve until ``stop()``; always closes sockets and storage on the way out.

        Each socket's ZMQ_FD wakes the loop. The FD is edge-triggered, so a socket is
        asked for ZMQ_EVENTS whenever its FD fired or we used the socket since we last
        asked (our own sends can consume an edge), and only then: asking costs a few
        microseconds a socket. While input keeps coming the loop only yields to other
        tasks between passes.
        """
        assert self.core is not None
        loop = asyncio.get_running_loop()
        self._wake = loop.create_future()
        socks = (self.zap, self.xpub, self.router, self.pull)
        ZAP, XPUB, ROUTER, PULL = range(4)
        stale = [True] * 4

        def fired(i: int) -> None:
            # Most wake-ups are libzmq's own commands (pipe activations, handshakes), not
            # messages: asking here, for 2 us, spares a whole turn of the loop for them.
            if readable(socks[i]):
                stale[i] = True
                self._poke()
            else:
                stale[i] = False

        def ready(i: int) -> bool:
            if not stale[i]:
                return False
            if readable(socks[i]):
                return True  # stays stale: we are about to read it
            stale[i] = False
            return False

        fds = [s.getsockopt(zmq.FD) for s in socks]
        for i, fd in enumerate(fds):
            loop.add_reader(fd, fired, i)
        next_tick = time.monotonic() + self.tick_every

        def tick() -> None:  # one standing timer wakes the loop for the tick
            nonlocal ticker
            self._poke()
            ticker = loop.call_later(self.tick_every, tick)

        ticker = loop.call_later(self.tick_every, tick)
        try:
            while not self.stopping.is_set():
                # The core runs on the monotonic clock (rate buckets, presence); it stamps
                # messages with the wall clock through wall_offset, so a clock step moves
                # timestamps only.
                now = time.monotonic()
                self.core.wall_offset = time.time() - now
                out = Outcome()
                read = 0
                # A failure in one input never stops the broker nor the other inputs;
                # what was taken before it is still carried out below.
                if ready(ZAP):
                    read += 1
                    try:
                        await self._zap()
                    except Exception:
                        self._failed("zap", now)
                if ready(XPUB):
                    read += 1
                    try:
                        self._subscriptions(now)
                    except Exception:
                        self._failed("subscriptions", now)
                if ready(ROUTER):
                    try:
                        read += self._requests(now, out)
                    except Exception:
                        read += 1
                        self._failed("requests", now)
                if ready(PULL):
                    try:
                        read += self._chat(now, out)
                    except Exception:
                        read += 1
                        self._failed("chat", now)
                if now >= next_tick:
                    try:
                        await self._expire_claims(now)
                    except Exception:
                        self._failed("claims", now)
                    live = len(self.core.sessions)
                    self.core.tick(now, out)
                    if len(self.core.sessions) < live:
                        log.info("%d session(s) gone silent for %.0fs: dropped", live - len(self.core.sessions), self.limits.presence_timeout)
                    next_tick = now + self.tick_every
                if out.publish:
                    stale[XPUB] = True
                if out.replies or out.acks or out.queries:
                    stale[ROUTER] = True
                try:
                    await self._apply(out)
                except Exception:  # never let one bad turn take the broker down
                    log.exception("failed to carry out a batch (%d to store)", len(out.store))
                if read:  # more is likely queued: let other tasks run, then look again
                    await asyncio.sleep(0)
                    continue
                if any(stale):
                    continue  # ask the sockets we just used
                self._wake = loop.create_future()
                await self._wake  # a socket, stop() or the ticker
            await self._farewell()
        finally:
            ticker.cancel()
            for fd in fds:
                loop.remove_reader(fd)
            self._close()
            await self.storage.close()
            log.info("broker stopped; history closed cleanly")
            self.stopped.set()

    def _failed(self, what: str, now: float) -> None:
        """Log a bug met while handling input (with its traceback, at most once a second)."""
        self.core.count("internal")  # type: ignore[union-attr]
        if now - self.bad.last.get("internal:" + what, 0.0) >= 1.0:
            self.bad.last["internal:" + what] = now
            log.exception("failed to handle %s; carrying on", what)

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def stop(self) -> None:
        self.stopping.set()
        self._poke()

    async def _farewell(self) -> None:
        """Tell subscribers we are going, and answer stragglers, for a moment."""
        out = Outcome()
        self.core.shutdown(time.monotonic(), out)  # type: ignore[union-attr]
        await self._apply(out)
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            try:
                frames = recv_parts(self.router)
            except zmq.Again:
                await asyncio.sleep(0.02)
                continue
            if len(frames) == 2:
                send_parts(self.router, [frames[0], p.encode(p.Error(code=p.ErrorCode.SHUTTING_DOWN, message="broker is shutting down"))])

    def _close(self) -> None:
        for sock in (self.router, self.pull, self.xpub, self.zap):
            sock.close(linger=0)
        self.ctx.term()

    # ------------------------------------------------------------ inputs

    async def _zap(self) -> None:
        await self._expire_claims(time.monotonic())  # also done once a tick by run()
        for _ in range(BATCH):
            try:
                frames = recv_parts(self.zap)
            except zmq.Again:
                return
            version, request_id, _domain, address, _identity, mechanism, *creds = frames + [b""] * max(0, 6 - len(frames))
            try:
                verdict = await self._decide(mechanism, creds, address.decode(errors="replace"))
            except Exception:
                log.exception("ZAP decision failed")
                verdict = auth.Verdict(b"500", "internal error")
            self.zap.send_multipart([version, request_id, verdict.status, verdict.text.encode(), verdict.user_id.encode(), b""])

    async def _decide(self, mechanism: bytes, creds: list[bytes], address: str) -> auth.Verdict:
        if mechanism != b"PLAIN" or len(creds) != 2:
            return auth.Verdict(b"400", "use the PLAIN mechanism")
        name = creds[0].decode("ascii", "replace")
        stored = self.digests.get(name)
        if stored is None and p.valid_name(name):
            stored = await self.storage.get_user(name)
        verdict = auth.check_plain(creds[0], creds[1], stored, self.reserved)
        if verdict.claim is not None:
            now = time.monotonic()
            wait = self.claims.wait(address, now)
            if wait:
                verdict = auth.Verdict(b"400", f"too many new names from {address}: try again in {wait:.0f}s")
            elif await self.storage.add_user(name, verdict.claim):
                self.core.add_user(name)  # type: ignore[union-attr]
                self.claims.claimed(address, name, verdict.claim, now)
                log.info("name %r claimed from %s", name, address)
            else:  # another broker claimed it first; decide again against that owner
                stored = await self.storage.get_user(name)
                verdict = auth.check_plain(creds[0], creds[1], stored, self.reserved)
        if verdict.status == b"200":
            self.digests[name] = verdict.claim or stored or b""
        else:
            log.info("refused %r from %s: %s", name, address, verdict.text)
        return verdict

    def _subscriptions(self, now: float) -> None:
        core = self.core
        assert core is not None
        for _ in range(BATCH):
            try:
                frame = self.xpub.recv(NOBLOCK, copy=False)
            except zmq.Again:
                return
            data = frame.bytes
            if not data:
                continue
            topic = data[1:]
            if data[0] == 0:
                self.xpub.setsockopt(zmq.UNSUBSCRIBE, topic)
                continue
            try:
                user = frame.get("User-Id")
            except zmq.ZMQError:  # the peer is gone already: its frame has no metadata left
                continue
            if data[0] == 1 and core.may_subscribe(user, topic):
                self.xpub.setsockopt(zmq.SUBSCRIBE, topic)
                # What was published before this took effect never reached the client:
                # tell it the heads now (on its inbox, in force before any room of its).
                heads = core.subscribed(user, topic)
                if heads is not None:
                    send_parts(self.xpub, [p.inbox_topic(user), p.encode(heads)])
            else:
                core.count("bad_subscription")
                self.bad.warn("subscription", f"{user} may not subscribe to {topic[:80]!r}", now)

    def _requests(self, now: float, out: Outcome) -> int:
        """Read requests and chat frames sent over the DEALER until about BATCH requests
        and lines were taken; return how many frames."""
        core = self.core
        assert core is not None
        count = taken = 0
        while taken < BATCH:
            try:
                frames = recv_frames(self.router)
            except zmq.Again:
                return count
            count += 1
            taken += 1
            sid = frames[0].bytes.decode("latin-1")
            if len(frames) != 2:
                core.count("bad_frame")
                out.error(sid, p.ErrorCode.BAD_FRAME, f"expected 1 body frame, got {len(frames) - 1}")
                continue
            data = frames[1].bytes
            user = frames[1].get("User-Id")
            try:
                req = p.decode_router(data, self.limits.max_bytes)
            except p.ProtocolError as exc:
                if exc.code != p.ErrorCode.TOO_LARGE:
                    try:  # a sound sends frame with some bad lines: take the good ones
                        msgs, bad = p.decode_sends(data, self.limits.max_bytes)
                    except p.ProtocolError:
                        pass
                    else:
                        self._take(user, msgs, bad, now, out, sid)
                        taken += len(msgs) + len(bad)
                        continue
                core.count(exc.code)
                self.bad.warn(exc.code, exc.message, now)
                out.error(sid, exc.code, exc.message, rid=exc.rid, cid=exc.cid)
                continue
            kind = type(req)
            if kind is p.Send or kind is p.Sends:
                lines = [req] if kind is p.Send else req.items  # type: ignore[union-attr]
                self._take(user, lines, [], now, out, sid)  # type: ignore[arg-type]
                taken += len(lines) - 1
                continue
            if kind is p.Hello and sid not in core.sessions:
                # Session ids stay out of INFO logs: whoever reads the log must not get a route.
                log.info("%s connected (%s)", user, req.client[:40] or "unknown client")  # type: ignore[union-attr]
                log.debug("session %s is %s", sid, user)
            elif kind is p.Bye:
                log.info("%s said goodbye", user)
            try:
                core.request(sid, user, req, now, out)  # type: ignore[arg-type]
            except Exception:  # a bug met by one request costs that request only
                self._failed("a request", now)
                out.error(sid, p.ErrorCode.INTERNAL, "the broker failed to handle this request", rid=req.rid)  # type: ignore[union-attr]
        return count

    def _chat(self, now: float, out: Outcome) -> int:
        """Read PULL frames until about BATCH chat lines were taken; return how many frames."""
        core = self.core
        assert core is not None
        count = lines = 0
        while lines < BATCH:
            try:
                frames = recv_frames(self.pull)
            except zmq.Again:
                return count
            count += 1
            if len(frames) != 1:
                core.count("bad_frame")
                self.bad.warn("bad_frame", f"chat line with {len(frames)} frames", now)
                lines += 1
                continue
            lines += self._lines(frames[0].get("User-Id"), frames[0].bytes, now, out)
        return count

    def _lines(self, user: str, data: bytes, now: float, out: Outcome) -> int:
        """Decode a PULLed ``send``/``sends`` body and take its lines; return how many."""
        try:
            msgs, bad = p.decode_sends(data, self.limits.max_bytes)
        except p.ProtocolError as exc:
            msgs, bad = [], [exc]
        self._take(user, msgs, bad, now, out)
        return max(1, len(msgs) + len(bad))

    def _take(self, user: str, msgs: list[p.Send], bad: list[p.ProtocolError], now: float, out: Outcome, via: str = "") -> None:
        """Hand good lines to the core; bad ones get an error at the sender's own session.

        ``via`` is the DEALER session the frame came in on (empty for PULL): a line
        sent there must name that session in its ``sid``.
        """
        core = self.core
        assert core is not None
        for exc in bad:
            core.count(exc.code)
            self.bad.warn(exc.code, exc.message, now)
            sid = via or exc.sid
            session = core.sessions.get(sid)
            if session is not None and session.name == user:
                out.error(sid, exc.code, exc.message, cid=exc.cid)  # the sender's own session
        if len(msgs) + len(bad) > 1:
            core.count("packed_frames")
        send = core.send
        for msg in msgs:
            if via and msg.sid != via:
                core.count("bad_sid")
                out.error(via, p.ErrorCode.BAD_REQUEST, "sid must be this DEALER's routing id", cid=msg.cid[: p.MAX_CID_LEN])
                continue
            send(user, msg, now, out)

    # ------------------------------------------------------------ outputs

    async def _apply(self, out: Outcome) -> None:
        """Store, then publish and reply. A batch storage refused, for any reason, is
        undone in the core and answered ``storage_unavailable`` when the store cannot
        take writes now (disk full...; logged once a second at most) or ``internal``
        otherwise (so resends are stored, not acked from dedup); a failing history query
        costs its own reply only."""
        core = self.core
        assert core is not None
        if out.store or out.members:
            try:
                await self.storage.append(out.store, out.members)
            except Exception as exc:
                if isinstance(exc, StorageUnavailable):
                    self.outage.failed(exc, len(out.store), time.monotonic())
                    code = p.ErrorCode.STORAGE_UNAVAILABLE
                else:
                    log.error("storing %d messages (%d membership changes) failed: %r", len(out.store), len(out.members), exc)
                    code = p.ErrorCode.INTERNAL
                # Nobody may see those seqs and every sender is told (protocol.md §10.2):
                # the core takes the batch back and rewrites what is left to do.
                core.undo(out, code)
            else:
                if self.outage.since:
                    self.outage.stored(time.monotonic())
        self._publish(out.publish)
        encode = p.encode
        router = self.router
        for sid, body in out.replies:
            send_parts(router, [sid.encode("latin-1"), encode(body)])
        for sid, items in out.acks.items():
            if items:
                send_parts(router, [sid.encode("latin-1"), encode(p.Ack(stored=items))])
        for query in out.queries:
            try:
                body = await self._history(query)
            except Exception as exc:
                log.error("history query %r failed: %r", query.request, exc)
                body = p.Error(code=p.ErrorCode.INTERNAL, message="could not read history; try again", rid=query.request.rid)
            send_parts(router, [query.sid.encode("latin-1"), encode(body)])

    async def _history(self, query: HistoryQuery) -> p.HistoryReply:
        req = query.request
        cap = p.MAX_REPLY_BYTES - 1024  # the reply's envelope
        if req.after >= 0:
            msgs = await self.storage.range(req.room, req.after, req.limit, req.before, max_bytes=cap)
        else:
            msgs = await self.storage.last(req.room, req.limit, req.before, max_bytes=cap)
        core = self.core
        assert core is not None
        # The head now: this turn's lines are stored by the time we answer (or undone).
        head = max(core.heads.get(req.room, 0), msgs[-1].seq if msgs else 0)
        return p.HistoryReply(
            rid=req.rid, room=req.room, epoch=core.epoch, head=head, messages=msgs, more=getattr(msgs, "cut", False)
        )

    def _publish(self, publish: list[tuple[bytes, p.Msg | p.Presence | p.Notice]]) -> None:
        """Send in order; consecutive Msgs of one topic go out as one Batch of at most
        about MAX_PUBLICATION_BYTES (so a subscriber's queue, counted in publications,
        is bounded in bytes too)."""
        xpub, encode = self.xpub, p.encode
        i, n = 0, len(publish)
        while i < n:
            topic, body = publish[i]
            j = i + 1
            if type(body) is p.Msg:
                size = len(body.text)  # type: ignore[union-attr]
                while j < n and publish[j][0] == topic and type(publish[j][1]) is p.Msg:
                    size += len(publish[j][1].text) + 128  # type: ignore[union-attr]
                    if size > MAX_PUBLICATION_BYTES:
                        break
                    j += 1
            if j - i == 1:
                send_parts(xpub, [topic, encode(body)])
            else:
                send_parts(xpub, [topic, encode(p.Batch(items=[m for _, m in publish[i:j]]))])  # type: ignore[misc]
                self.core.count("batches")  # type: ignore[union-attr]
            i = j


async def serve(
    bind: str, storage: Storage, limits: Limits = Limits(), guard: GuardConfig | None = None,
    retention: RetentionPolicy | None = None,
) -> None:
    """Run a broker until SIGINT or SIGTERM (with retention pruning beside it, if asked)."""
    import signal

    broker = Broker(bind, storage, limits, guard=guard)
    await broker.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, broker.stop)
    pruner = asyncio.create_task(Retention(storage, retention).run()) if retention and retention.active else None

    async def stop_pruning() -> None:  # before run() closes the storage it prunes
        await broker.stopping.wait()
        if pruner is not None:
            pruner.cancel()

    stopper = asyncio.create_task(stop_pruning())
    try:
        await broker.run()
    finally:
        stopper.cancel()
        if pruner is not None:
            pruner.cancel()
