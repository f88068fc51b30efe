"""The broker process: a thin asyncio shell around zchat.core.

One task owns every socket. It waits on a poller, drains whatever is ready without
blocking (so one client can never stall the others), feeds the core, then carries
out the core's Outcome: store (one transaction per batch), publish, reply.

Sockets (all CURVE-encrypted and authenticated through the ZAP handler below):
  ROUTER  port P    requests and replies, acks and errors for chat lines
  PULL    port P+1  chat lines from the clients' PUSH
  XPUB    port P+2  fan-out; XPUB_MANUAL so each subscription is authorised
  ROUTER  port P+3  plain and unauthenticated: answers its public key only (for
                    clients pinning the broker on first use), in a thread of its own
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import os
import secrets
import time
from typing import Any

import zmq
from zmq.utils import z85

from zchat import __version__, auth, keys
from zchat.sockio import NOBLOCK, readable, recv_frames, recv_parts, send_parts
from zchat import protocol as p
from zchat.core import Core, HistoryQuery, Limits, Outcome
from zchat.guard import Claims, ConnectionGuard, GuardConfig, connection_cap, cut_connection, peer_name, raise_fd_limit
from zchat.metrics import Stats, status as fill_status
from zchat.retention import Retention, RetentionPolicy
from zchat.storage import Storage, StorageError, StorageUnavailable

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zchat"
EDGE_REQUESTS = (p.Claim, p.Invite, p.KeyAdd, p.KeyRevoke, p.KeyList)
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
        guard: GuardConfig | None = None, key_dir: os.PathLike | str | None = None,
        insecure_plaintext: bool = False, registration: str = "open", admins: tuple[str, ...] = (),
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
        # Security (see _start and _decide): CURVE with the keypair in key_dir (None: a
        # keypair for this run only), or PLAIN for tests that ask for it by name.
        self.key_dir = key_dir
        self.insecure_plaintext = insecure_plaintext
        self.registration = auth.check_registration(registration)
        self.admins = tuple(admins)
        self.public_key = b""
        self.key_names: dict[bytes, str] = {}  # raw client key -> the name it owns
        self.name_keys: dict[str, list[bytes]] = {}  # name -> its keys (devices), in order
        self.revoked: set[bytes] = set()  # keys taken away while this broker ran (refused)
        self.key_conns: dict[bytes, collections.deque] = {}  # key -> (label, fd, peer) of its live connections seen
        self.key_writes: set[str] = set()  # names whose keys changed and are yet to be stored
        self.intents = auth.Intents()
        self.invites = auth.Invites()
        self.stats = Stats()  # plain counters for metrics and `zchat status` (zchat.metrics)
        self.retention: Retention | None = None  # set by serve() when retention is on

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
            for sock in (getattr(self, name, None) for name in ("router", "pull", "xpub", "zap", "keysock")):
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
        if self.insecure_plaintext:
            log.error("!!! INSECURE PLAINTEXT MODE (tests only): names' secrets and every message cross the network in clear !!!")
            mech: dict[str, Any] = dict(plain_server=1)
        else:
            keys.require_curve()
            if self.key_dir is not None:
                public, secret_key = keys.broker_keypair(__import__("pathlib").Path(self.key_dir))
            else:
                public, secret_key = zmq.curve_keypair()
                log.warning("no key directory: this broker's keypair lasts for this run only")
            self.public_key = public
            mech = dict(curve_server=1, curve_secretkey=secret_key)
            for name in users:
                stored = await self.storage.get_user(name)
                for key in auth.owner_keys(stored):
                    self.key_names[key] = name
                    self.name_keys.setdefault(name, []).append(key)
        self.guard = ConnectionGuard(self.ctx, g, connection_cap(g, soft))
        self.zap = self._socket(zmq.REP)
        self.zap.bind(ZAP_ENDPOINT)
        # The socket limit is twice the body limit: a body a little too big gets a clear
        # too_large error; a frame beyond twice the limit costs its sender the connection.
        maxmsgsize = 2 * self.limits.max_bytes
        rcvhwm = g.rcvhwm(maxmsgsize)
        # A handshake must finish within handshake_timeout. Dead hosts are found by TCP
        # keepalive (idle 60 s, then 6 probes 10 s apart), not by ZMTP heartbeats: in
        # libzmq 4.3.5 the heartbeat timer calls out_event() on an engine that has already
        # met an I/O error (stream_engine_base.cpp timer_event), which aborts the whole
        # broker on "Assertion failed: !_io_error"; a flood that fills a connection's
        # receive queue made that happen (twice in six 10 s runs of the stalled-subscriber
        # attack). A client whose connection went silent starts over with a new session
        # id (the old pipe's routing id stays held until TCP gives up, and takes nothing).
        secure = dict(
            zap_domain=ZAP_DOMAIN, maxmsgsize=maxmsgsize, rcvhwm=rcvhwm, **mech,
            handshake_ivl=max(100, int(g.handshake_timeout * 1000)),
            tcp_keepalive=1, tcp_keepalive_idle=60, tcp_keepalive_intvl=10, tcp_keepalive_cnt=6,
        )
        # No router_handover: a connection that presents a routing id already in use is
        # ignored by libzmq rather than given that session's route (a takeover).
        self.router = self._socket(zmq.ROUTER, router_handover=0, sndhwm=g.router_sndhwm(), **secure)
        self.pull = self._socket(zmq.PULL, **secure)
        self.xpub = self._socket(zmq.XPUB, xpub_manual=1, sndhwm=g.xpub_sndhwm(self.limits.pub_hwm, MAX_PUBLICATION_BYTES), **secure)
        watched = [("requests", self.router), ("chat", self.pull), ("fan-out", self.xpub)]
        if not self.insecure_plaintext:
            # Plain on purpose: a client asks for the key before it can speak CURVE. It
            # answers 40 public characters to a 10-byte question; queues of 16 tiny frames.
            self.keysock = self._socket(
                zmq.ROUTER, maxmsgsize=64, rcvhwm=16, sndhwm=16, router_mandatory=0,
                handshake_ivl=max(100, int(g.handshake_timeout * 1000)),
            )
            watched.append(("keys", self.keysock))
        for label, sock in watched:
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
        if self.insecure_plaintext:
            keys.declare_insecure(self.endpoint)
            self.address = self.endpoint
        else:
            self.keys_port = self._serve_key(base, port + keys.KEYS_PORT_OFFSET if port else 0)
            self.address = keys.keyed_address(self.endpoint, self.public_key)
            log.info("broker key %s (fingerprint %s); give users the address %s", self.public_key.decode(), keys.fingerprint(self.public_key), self.address)
            log.info("registration: %s; admins: %s", self.registration, ",".join(self.admins) or "none")
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

    def _serve_key(self, base: str, port: int) -> int:
        """Bind the plain key endpoint and hand its socket to a thread that answers
        KEY_REQUEST with this broker's public key; return its port. The thread alone
        uses the socket from then on and closes it when the context is terminated."""
        sock = self.keysock
        sock.bind(f"{base}:{port}" if port else f"{base}:*")
        bound = int(sock.last_endpoint.decode().rpartition(":")[2])
        answer = keys.KEY_REPLY_PREFIX + self.public_key

        def serve() -> None:
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            try:
                while True:
                    if not poller.poll(1000):
                        continue
                    for _ in range(BATCH):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if len(frames) == 2 and frames[1] == keys.KEY_REQUEST:
                            try:
                                sock.send_multipart([frames[0], answer], zmq.NOBLOCK)
                            except zmq.ZMQError:
                                pass  # that peer does not read: its answer is dropped
            except zmq.ContextTerminated:
                pass
            except Exception:  # pragma: no cover - never take the broker down
                log.exception("the key endpoint failed; clients must get the key in the address")
            finally:
                sock.close(linger=0)

        import threading

        threading.Thread(target=serve, name="zchat-key", daemon=True).start()
        self.keysock = None  # type: ignore[assignment]  # the thread's now
        return bound

    async def _expire_claims(self, now: float) -> None:
        """Free names claimed more than claim_timeout ago by a handshake that never said
        hello (call once a tick). A name whose owner said hello, joined or sent is kept."""
        core = self.core
        if core is None:
            return
        if self.key_writes:
            await self._store_keys()
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
                for key in self.name_keys.pop(name, []):  # a key's claim, released: the key owns nothing again
                    self.key_names.pop(key, None)
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
                turn = time.perf_counter()
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
                    self.stats.sample(now)
                if out.publish:
                    stale[XPUB] = True
                if out.replies or out.acks or out.queries:
                    stale[ROUTER] = True
                try:
                    await self._apply(out)
                except Exception:  # never let one bad turn take the broker down
                    log.exception("failed to carry out a batch (%d to store)", len(out.store))
                if read:  # more is likely queued: let other tasks run, then look again
                    self.stats.turn_seconds.observe(time.perf_counter() - turn)
                    self.stats.turn_items = read
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
            self.zap.send_multipart([version, request_id, verdict.status, verdict.text.encode(), verdict.user_id.encode(), verdict.metadata])
            key = "accepted" if verdict.status == b"200" else "refused"
            self.stats.zap[key] = self.stats.zap.get(key, 0) + 1

    async def _decide(self, mechanism: bytes, creds: list[bytes], address: str) -> auth.Verdict:
        if not self.insecure_plaintext:
            return await self._decide_curve(mechanism, creds, address)
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

    async def _decide_curve(self, mechanism: bytes, creds: list[bytes], address: str) -> auth.Verdict:
        """A CURVE handshake: the client's key owns a name, or is finishing a claim it
        made (auth.Intents), or it is a look-only session that may make one."""
        if mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
            return auth.Verdict(b"400", "use the CURVE mechanism")
        key = creds[0]
        name = self.key_names.get(key)
        if name is not None:
            return auth.owned(name, key)
        if key in self.revoked:
            return auth.Verdict(b"400", "this key was revoked")
        now = time.monotonic()
        intent = self.intents.take(key, now)
        if intent is None:
            return auth.looker(key)
        verdict = await self._finish_claim(key, intent, address, now)
        if verdict.status != b"200":
            log.info("refused the claim of %r from %s: %s", intent.name, address, verdict.text)
        return verdict

    async def _finish_claim(self, key: bytes, intent: "auth.Intent", address: str, now: float) -> auth.Verdict:
        name = intent.name
        stored = await self.storage.get_user(name)
        admin = auth.is_admin(name, key, self.admins)
        if stored is None:
            refusal = auth.may_register(name, self.reserved, self.registration, admin, intent.invite, self.invites)
            if refusal:
                return auth.Verdict(b"400", refusal)
            wait = self.claims.wait(address, now)
            if wait:
                return auth.Verdict(b"400", f"too many new names from {address}: try again in {wait:.0f}s")
            owned = auth.key_digest([key])
            if not await self.storage.add_user(name, owned):
                return auth.Verdict(b"400", f"name {name!r} is taken")
            if intent.invite:
                self.invites.use(intent.invite)
            self.core.add_user(name)  # type: ignore[union-attr]
            self.claims.claimed(address, name, owned, now)
            log.info("name %r claimed by key %s from %s", name, keys.fingerprint(z85.encode(key)), address)
        elif auth.owner_keys(stored):
            return auth.Verdict(b"400", f"name {name!r} is taken")  # devices are added with `zchat keys add`
        elif intent.secret and hmac.compare_digest(intent.secret, stored.hex()):
            owned = auth.key_digest([key])
            if not (await self.storage.release_user(name, stored) and await self.storage.add_user(name, owned)):
                return auth.Verdict(b"400", f"name {name!r} changed while moving it to a key: try again")
            log.info("name %r moved from its PLAIN secret to key %s", name, keys.fingerprint(z85.encode(key)))
        else:
            return auth.Verdict(b"400", f"name {name!r} is taken (a PLAIN-era name moves to a key only with its secret)")
        self.key_names[key] = name
        self.name_keys[name] = [key]
        return auth.owned(name, key)

    def _note_connection(self, label: str, frame: zmq.Frame) -> None:
        """Remember which TCP connection a key's hello or subscription came on, so that
        revoking the key can cut it (a few per key; its peer's port tells a reused
        descriptor from the connection itself)."""
        try:
            key_text, fd = frame.get("X-Key"), frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return
        if not key_text or fd < 0:
            return
        key = z85.decode(key_text)
        if key not in self.key_names:
            return
        conns = self.key_conns.setdefault(key, collections.deque(maxlen=16))
        entry = (label, fd, peer_name(fd))
        if entry not in conns:
            conns.append(entry)

    def _edge_request(self, sid: str, frame: zmq.Frame, req: Any, now: float, out: Outcome) -> None:
        """Claim, Invite, KeyAdd, KeyRevoke, KeyList: keys and names, answered at once
        from memory (a change of keys is stored at the next tick, see _store_keys)."""
        if type(req) is p.Claim:
            self._claim(sid, frame, req, now, out)
            return
        try:
            user, key_text = frame.get("User-Id"), frame.get("X-Key")
        except zmq.ZMQError:
            return
        if self.insecure_plaintext or not key_text or user == p.LOOKER:
            out.error(sid, p.ErrorCode.FORBIDDEN, "keys and invites need a named CURVE session", rid=req.rid)
            return
        me = z85.decode(key_text)
        kind = type(req)
        if kind is p.Invite:
            if not auth.is_admin(user, me, self.admins):
                out.error(sid, p.ErrorCode.FORBIDDEN, "only the broker's admins make invite codes", rid=req.rid)
                return
            code = self.invites.make(now)
            if code is None:
                out.error(sid, p.ErrorCode.LIMIT_REACHED, f"{self.invites.limit} unused invite codes already", rid=req.rid)
                return
            log.info("%s made an invite code", user)
            out.replies.append((sid, p.Invited(rid=req.rid, code=code)))
            return
        mine = self.name_keys.setdefault(user, [])
        if kind is p.KeyList:
            out.replies.append((sid, p.KeysReply(rid=req.rid, keys=[z85.encode(k).decode() for k in mine])))
            return
        if not keys.valid_key(req.key):
            out.error(sid, p.ErrorCode.BAD_REQUEST, "expected a 40-character Z85 public key", rid=req.rid)
            return
        other = z85.decode(req.key)
        if kind is p.KeyAdd:
            if other in self.key_names:
                out.error(sid, p.ErrorCode.BAD_REQUEST, "that key owns a name already", rid=req.rid)
                return
            if len(mine) >= auth.MAX_DEVICES:
                out.error(sid, p.ErrorCode.LIMIT_REACHED, f"a name has at most {auth.MAX_DEVICES} keys", rid=req.rid)
                return
            self.revoked.discard(other)
            mine.append(other)
            self.key_names[other] = user
            log.info("%s authorised key %s", user, keys.fingerprint(req.key))
        else:  # KeyRevoke
            if other not in mine:
                out.error(sid, p.ErrorCode.BAD_REQUEST, "that key is not one of this name's", rid=req.rid)
                return
            if len(mine) == 1:
                out.error(sid, p.ErrorCode.BAD_REQUEST, "that is the name's last key", rid=req.rid)
                return
            mine.remove(other)
            del self.key_names[other]
            if len(self.revoked) < auth.MAX_REVOKED:
                self.revoked.add(other)
            cut = 0
            for _label, fd, peer in self.key_conns.pop(other, ()):
                if peer is not None and peer_name(fd) == peer:
                    cut_connection(fd)
                    cut += 1
            log.info("%s revoked key %s (%d live connection(s) cut)", user, keys.fingerprint(req.key), cut)
        self.key_writes.add(user)
        out.replies.append((sid, p.Ok(rid=req.rid)))

    async def _store_keys(self) -> None:
        """Store the key lists of names changed by KeyAdd/KeyRevoke (once a tick)."""
        for name in list(self.key_writes):
            self.key_writes.discard(name)
            stored = await self.storage.get_user(name)
            wanted = auth.key_digest(self.name_keys.get(name, []))
            if stored == wanted:
                continue
            if stored is None or not await self.storage.release_user(name, stored) or not await self.storage.add_user(name, wanted):
                log.warning("could not store the keys of %r", name)

    def _claim(self, sid: str, frame: zmq.Frame, req: p.Claim, now: float, out: Outcome) -> None:
        """A look-only connection asks that its key own ``req.name``: remember that
        (bounded, for claim_timeout) and say ok; the client dials again and the ZAP
        handler decides (_finish_claim). Nothing is stored here."""
        try:
            user, key_text = frame.get("User-Id"), frame.get("X-Key")
        except zmq.ZMQError:
            user, key_text = "", ""
        if user != p.LOOKER or not key_text:
            out.error(sid, p.ErrorCode.BAD_REQUEST, "this connection owns a name already", rid=req.rid)
            return
        if not p.valid_name(req.name):
            out.error(sid, p.ErrorCode.BAD_NAME, f"bad name {req.name!r}: use a-z, 0-9, '_', '-' (max {p.MAX_NAME_LEN})", rid=req.rid)
            return
        if not self.intents.add(z85.decode(key_text), req, now + self.claims.timeout):
            out.error(sid, p.ErrorCode.LIMIT_REACHED, "too many claims in progress: try again shortly", rid=req.rid, retry_after=1.0)
            return
        out.replies.append((sid, p.Ok(rid=req.rid)))

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
            if data[0] == 1 and not self.insecure_plaintext:
                self._note_connection("fan-out", frame)
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
            if kind in EDGE_REQUESTS:  # the broker's, not the core's: keys and names are the edge's
                self._edge_request(sid, frames[1], req, now, out)
                continue
            if kind is p.Hello and not self.insecure_plaintext:
                self._note_connection("requests", frames[1])
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
        self.stats.received += len(msgs) + len(bad)
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
        stats = self.stats
        if out.store or out.members:
            began = time.perf_counter()
            try:
                await self.storage.append(out.store, out.members)
                stats.stored += len(out.store)
            except Exception as exc:
                stats.store_failed += 1
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
            stats.append_seconds.observe(time.perf_counter() - began)
        self._publish(out.publish)
        encode = p.encode
        router = self.router
        for sid, body in out.replies:
            kind = type(body)
            if kind is p.Error:
                stats.error(body.code, bool(body.cid))  # type: ignore[union-attr]
            elif kind is p.StatusReply:
                body = fill_status(self, body)  # type: ignore[arg-type]
            send_parts(router, [sid.encode("latin-1"), encode(body)])
        stats.replies += len(out.replies)
        for sid, items in out.acks.items():
            if items:
                send_parts(router, [sid.encode("latin-1"), encode(p.Ack(stored=items))])
        stats.acks += len(out.acks)
        for query in out.queries:
            stats.history["range" if query.request.after >= 0 else "last"] += 1
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
        frames = 0
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
            frames += 1
            i = j
        self.stats.publications += frames
        self.stats.published += n


async def serve(
    bind: str, storage: Storage, limits: Limits = Limits(), guard: GuardConfig | None = None,
    retention: RetentionPolicy | None = None, metrics: str | None = None, metrics_public: bool = False, **security: Any,
) -> None:
    """Run a broker until SIGINT or SIGTERM (with retention pruning beside it, if asked);
    with ``metrics`` (HOST:PORT) also serve Prometheus metrics there (zchat.metrics),
    from a thread of their own. ``security``: Broker's key_dir, registration, admins."""
    import signal

    broker = Broker(bind, storage, limits, guard=guard, **security)
    await broker.start()
    server = None
    if metrics:
        from zchat.metrics import start_metrics

        try:
            server = start_metrics(broker, metrics, metrics_public)
        except BaseException:
            broker.stop()  # run() closes sockets and storage on its way out
            await broker.run()
            raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, broker.stop)
    pruner = None
    if retention and retention.active:
        broker.retention = Retention(storage, retention)  # its counts are metrics
        pruner = asyncio.create_task(broker.retention.run())

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
        if server is not None:
            server.close()
