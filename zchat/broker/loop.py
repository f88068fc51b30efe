"""The broker's loop: one task owns every socket, waits on the poller, drains what is
ready in bounded turns (zchat.broker.inputs), feeds the core, then carries out its
Outcome: store (one transaction per batch), publish, reply."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import resource
import time
from typing import Any

import zmq

from zchat import auth
from zchat import protocol as p
from zchat.broker.constants import MAX_PUBLICATION_BYTES
from zchat.broker.edge import COUNTED_REFUSALS, Edge
from zchat.broker.engines import Engine, LocalEngine
from zchat.broker.inputs import Inputs, read_ahead_queue
from zchat.broker.liveness import Liveness
from zchat.broker.moderation import Moderating
from zchat.broker.outage import RateLimitedLog, StorageOutage
from zchat.broker.search import Searching
from zchat.broker.startup import Startup
from zchat.broker.zap import Zap
from zchat.core import Core, EditQuery, HistoryQuery, Limits, Outcome, SearchQuery
from zchat.guard import Claims, ConnectionGuard, GuardConfig, Refusals
from zchat.metrics import Stats
from zchat.metrics import status as fill_status
from zchat.retention import Retention
from zchat.sockio import readable, recv_parts, send_parts
from zchat.storage import Storage, StorageUnavailable

log = logging.getLogger(__package__)  # one logger for the whole broker: "zchat.broker"

#: A turn this long (seconds) is logged at DEBUG with what it held (Broker._slow_turn).
SLOW_TURN = 0.005


class Broker(Startup, Zap, Edge, Inputs, Moderating, Searching, Liveness):
    """The broker process's state and loop; its parts (start-up, ZAP, edge requests,
    inputs) are mixins in their own files, all on this one instance."""

    def __init__(
        self, bind: str, storage: Storage, limits: Limits = Limits(), tick: float | None = None,
        guard: GuardConfig | None = None, key_dir: os.PathLike | str | None = None,
        insecure_plaintext: bool = False, registration: str = "open", admins: tuple[str, ...] = (),
        io_threads: int = 1,
    ) -> None:
        self.bind = bind
        self.storage = storage
        self.limits = limits
        self.tick_every = tick if tick is not None else min(1.0, limits.heartbeat / 2)
        # Plain sockets: the loop watches their FDs itself. libzmq's I/O threads do the
        # TCP and CURVE work; one is the default (zchat bench --encryption measures two).
        self.ctx = zmq.Context(io_threads=io_threads)
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
        self.revoked: set[bytes] = set()  # keys taken away (stored; loaded at start): refused at ZAP
        self.key_conns: dict[bytes, collections.deque] = {}  # key -> (label, fd, peer) of its live connections seen
        self.key_writes: set[str] = set()  # names whose keys changed and are yet to be stored
        # Z85 keys whose live connections are cut at their next frame (revoked: for this
        # run; cooling off: until the time given), and the PULL connection seen per fd.
        self.barred: dict[str, float] = {}
        self.barred_sweep = 0.0  # when expired entries of barred are dropped next
        self.pull_fds: dict[int, str] = {}
        self.edge_queue: list[tuple[str, Any, str, bytes]] = []  # edge requests that store before answering
        self.unapplied: collections.deque = collections.deque()  # edits/deletes storage refused (zchat.broker.moderation)
        g = self.guard_config
        self.refusals = Refusals(g.max_refusals, g.refusal_window, g.cooloff)  # per user: ignored retry_after
        self.zap_refusals = Refusals(max(1, g.max_refusals // 10) if g.max_refusals > 0 else 0, g.refusal_window, g.cooloff)  # per address
        self.intents = auth.Intents()
        self.stats = Stats()  # plain counters for metrics and `zchat status` (zchat.metrics)
        self.retention: Retention | None = None  # set by serve() when retention is on
        # How a turn is stored and other brokers heard (zchat.broker.engines): made by
        # _start, the Redis engine on a Redis store.
        self.engine: Engine = LocalEngine(storage)
        self._liveness_init()
        self.more_input = False  # an input stopped at its BATCH this turn (set by zchat.broker.inputs)
        self.request_queue = read_ahead_queue()  # frames read ahead, taken fairly (zchat.broker.inputs)
        self.chat_queue = read_ahead_queue()
        self.store_took = 0.0  # seconds the last turn's store took (for the slow-turn log)
        self.searched: list[tuple[str, bytes]] = []  # search replies ready to send (zchat.broker.search)
        self.searching: set[asyncio.Task] = set()  # searches under way

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
            self._forget_plaintext()
            await self.storage.close()
            raise

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
        known = [False] * 4  # readable, as fired() just asked: ready() need not ask again

        def fired(i: int) -> None:
            # Most wake-ups are libzmq's own commands (pipe activations, handshakes), not
            # messages: asking here, for 2 us, spares a whole turn of the loop for them.
            if readable(socks[i]):
                stale[i] = known[i] = True
                self._poke()
            else:
                stale[i] = False

        def ready(i: int) -> bool:
            if not stale[i]:
                return False
            if known[i]:  # nothing read it since fired() saw it readable
                known[i] = False
                return True
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
        guard = self.guard
        if guard is not None:  # a request connection ended: its session goes offline now

            def on_gone() -> None:  # the guard's thread
                try:
                    loop.call_soon_threadsafe(self._poke)
                except RuntimeError:  # the loop is closed: the broker is stopping
                    pass

            guard.on_gone = on_gone
        timing = log.isEnabledFor(logging.DEBUG)  # slow turns are logged (_slow_turn)
        cpu = proc = 0.0
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        try:
            while not self.stopping.is_set():
                # The core runs on the monotonic clock (rate buckets, presence); it stamps
                # messages with the wall clock through wall_offset, so a clock step moves
                # timestamps only.
                now = time.monotonic()
                turn = time.perf_counter()
                if timing:  # DEBUG: this thread's CPU too, to tell work from waiting for a core
                    cpu, proc = time.thread_time(), time.process_time()
                    usage = resource.getrusage(resource.RUSAGE_THREAD)
                self.core.wall_offset = time.time() - now
                out = Outcome()
                self.turn_bytes = 0  # the inputs' byte budget (zchat.broker.inputs)
                read = self.engine.drain(self.core, now, out)  # what other brokers stored (several brokers)
                # A failure in one input never stops the broker nor the other inputs;
                # what was taken before it is still carried out below.
                if ready(ZAP):
                    read += 1
                    self.more_input = True  # one handshake a turn: others may wait
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
                # Ended connections first: a client whose connection came back on the
                # same descriptor number must not be closed by its old one's end.
                if guard is not None and (guard.gone or self.dying_due):
                    try:
                        self._connections_gone(now, out)
                    except Exception:
                        self._failed("ended connections", now)
                fresh = ready(ROUTER)
                if fresh or self.request_queue:  # new frames, or frames read ahead
                    try:
                        read += self._requests(now, out, fresh)
                    except Exception:
                        read += 1
                        self._failed("requests", now)
                fresh = ready(PULL)
                if fresh or self.chat_queue:
                    try:
                        read += self._chat(now, out, fresh)
                    except Exception:
                        read += 1
                        self._failed("chat", now)
                if self.edge_queue:
                    try:
                        await self._serve_edge(now, out)
                    except Exception:
                        self._failed("edge requests", now)
                if now >= next_tick:
                    try:
                        await self._expire_claims(now)
                    except Exception:
                        self._failed("claims", now)
                    try:
                        await self._retry_changes()
                    except Exception:
                        self._failed("edits", now)
                    live = len(self.core.sessions)
                    self.core.tick(now, out)
                    if len(self.core.sessions) < live:
                        log.info("%d session(s) gone silent for %.0fs: dropped", live - len(self.core.sessions), self.limits.presence_timeout)
                    next_tick = now + self.tick_every
                    self.stats.sample(now)
                    self._release_pongs(out)
                if out.later is not None or self.held:
                    self._hold_pongs(out)
                if out.publish:
                    stale[XPUB] = True
                if self.searched:
                    self._send_searched()
                    stale[ROUTER] = True
                if out.replies or out.acks or out.queries:
                    stale[ROUTER] = True
                applying = time.perf_counter()
                try:
                    await self._apply(out)
                except Exception:  # never let one bad turn take the broker down
                    log.exception("failed to carry out a batch (%d to store)", len(out.store))
                if read:
                    took = time.perf_counter() - turn
                    self.stats.turn_seconds.observe(took)
                    if timing and took >= SLOW_TURN:
                        self._slow_turn(took, time.thread_time() - cpu, time.process_time() - proc, usage, applying - turn, read, out)
                    self.stats.turn_items = read
                    if self.more_input:  # more is queued: let other tasks run, then look again
                        self.more_input = False
                        await asyncio.sleep(0)
                        continue
                    # Every input we read was drained: the quiet path skips a pass of the
                    # event loop and only asks the sockets we used (below) before waiting.
                # Ask the sockets we used (our sends may have taken their FD's edge) here, not
                # in a turn of their own: an empty turn costs more than the asking.
                for i in range(4):
                    if stale[i] and not known[i]:
                        if readable(socks[i]):
                            known[i] = True  # the next turn reads it without asking again
                        else:
                            stale[i] = False
                if any(stale) or self.request_queue or self.chat_queue or self.searched:
                    continue
                self._wake = loop.create_future()
                await self._wake  # a socket, stop() or the ticker
            await self._farewell()
        finally:
            ticker.cancel()
            for task in list(self.searching):  # their replies would have nobody to send them
                task.cancel()
            if guard is not None:
                guard.on_gone = None
            for fd in fds:
                loop.remove_reader(fd)
            try:
                await self.engine.stop()
            except Exception:
                log.exception("the %s engine failed to stop", self.engine.name)
            self._close()
            await self.storage.close()
            log.info("broker stopped; history closed cleanly")
            self.stopped.set()

    def _slow_turn(
        self, took: float, cpu: float, proc: float, usage: resource.struct_rusage, reading: float, read: int, out: Outcome,
    ) -> None:
        """Say what a slow turn held (DEBUG): finding what made one user's call slow. CPU
        far below the wall time: the thread waited (for a core, the disk, the GIL); the
        process's other threads' CPU meanwhile (libzmq's I/O thread decrypting, the guard)
        says whether they took the core or the GIL. This thread's context switches: waits
        (the GIL, a lock, the disk) or preemptions (a busy core); its page faults."""
        now = resource.getrusage(resource.RUSAGE_THREAD)
        log.debug(
            "slow turn %.1f ms (CPU %.1f, other threads %.1f; %d waits, %d preemptions, %d+%d faults) at %.3f: "
            "%d inputs, %d bytes read in %.1f ms, stored %d in %.1f ms, %d published, %d replies, %d acks",
            took * 1e3, cpu * 1e3, max(0.0, proc - cpu) * 1e3, now.ru_nvcsw - usage.ru_nvcsw, now.ru_nivcsw - usage.ru_nivcsw,
            now.ru_minflt - usage.ru_minflt, now.ru_majflt - usage.ru_majflt, time.monotonic(),
            read, self.turn_bytes, reading * 1e3, len(out.store),
            self.store_took * 1e3, len(out.publish), len(out.replies), len(out.acks),
        )

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
        shutting = p.encode(p.Error(code=p.ErrorCode.SHUTTING_DOWN, message="broker is shutting down"))
        while (item := self.request_queue.pop()) is not None:  # read ahead, never taken: answered too
            if len(item[0]) == 2:
                send_parts(self.router, [item[0][0].bytes, shutting])
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            try:
                frames = recv_parts(self.router)
            except zmq.Again:
                await asyncio.sleep(0.02)
                continue
            if len(frames) == 2:
                send_parts(self.router, [frames[0], shutting])

    def _close(self) -> None:
        for sock in (self.router, self.pull, self.xpub, self.zap):
            sock.close(linger=0)
        self.ctx.term()
        self._forget_plaintext()

    def _forget_plaintext(self) -> None:
        """A test-only plaintext broker's declaration (keys.declare_insecure) ends with it."""
        if self.insecure_plaintext and self.endpoint:
            from zchat import keys

            keys.undeclare_insecure(self.endpoint)

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
        now = time.monotonic()
        self.store_took = 0.0
        if out.store or out.members or out.room_changes:
            began = time.perf_counter()
            rooms_stored = False
            try:
                if out.room_changes:  # first: a batch is never stored without its settings
                    await self.storage.change_rooms(out.room_changes)
                    rooms_stored = True
                await self.engine.store(core, out)
                stats.stored += len(out.store)
            except Exception as exc:
                stats.store_failed += 1
                if isinstance(exc, StorageUnavailable):
                    self.outage.failed(exc, len(out.store), time.monotonic())
                    code = p.ErrorCode.STORAGE_UNAVAILABLE
                else:
                    log.error("storing %d messages (%d membership changes) failed: %r", len(out.store), len(out.members), exc)
                    code = p.ErrorCode.INTERNAL
                if rooms_stored:
                    await self._unstore_rooms(out.room_changes)
                # Nobody may see those seqs and every sender is told (protocol.md §10.2):
                # the core takes the batch back and rewrites what is left to do.
                core.undo(out, code)
            else:
                if self.outage.since:
                    self.outage.stored(time.monotonic())
            self.store_took = time.perf_counter() - began
            stats.append_seconds.observe(self.store_took)
        if out.went or out.members or out.room_changes:
            await self.engine.after(core, out)
        if out.tombstones or out.cut or out.released or out.edits:
            await self._moderated(out)
        self._publish(out.publish)
        encode = p.encode
        router = self.router
        weights = out.weights or {}
        for sid, body in out.replies:
            kind = type(body)
            if kind is p.Error:
                stats.error(body.code, bool(body.cid))  # type: ignore[union-attr]
                if body.code in COUNTED_REFUSALS:  # type: ignore[union-attr]
                    self._refused(sid, body, now, weights.get(id(body), 1.0))  # type: ignore[arg-type]
            elif kind is p.StatusReply:
                body = fill_status(self, body)  # type: ignore[arg-type]
            send_parts(router, [sid.encode("latin-1"), encode(body)])
        stats.replies += len(out.replies)
        for sid, items in out.acks.items():
            if items:
                send_parts(router, [sid.encode("latin-1"), encode(p.Ack(stored=items))])
        stats.acks += len(out.acks)
        for query in out.queries:
            if type(query) is SearchQuery:
                self._search_later(query)  # its reply comes in a later turn (zchat.broker.search)
                continue
            if type(query) is EditQuery:
                await self._edit_line(query)
                continue
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
        more = getattr(msgs, "cut", False)
        if query.floor and msgs and msgs[0].seq <= query.floor:  # an earlier owner's lines: none older for this reader
            msgs, more = [m for m in msgs if m.seq > query.floor], False
        return p.HistoryReply(rid=req.rid, room=req.room, epoch=core.epoch, head=head, messages=msgs, more=more)

    def _publish(self, publish: list[tuple[bytes, p.Msg | p.Presence | p.Notice | p.Retopic]]) -> None:
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
