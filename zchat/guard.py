"""The broker's edge: descriptors, connections per address, name claims, queue budgets.

Three pieces, each bounded:

* :class:`GuardConfig` holds the settings and turns the byte budgets into ZeroMQ
  high-water marks (see its docstring for the worst-case memory arithmetic).
* :class:`ConnectionGuard` watches the ROUTER, PULL and XPUB sockets through socket
  monitors in a thread of its own. Every accepted TCP connection is counted by the
  peer's address (``getpeername`` on a duplicate of libzmq's descriptor); one over the
  per-address cap, the total cap, or the cap on connections still in their handshake is
  cut at once with ``shutdown(SHUT_RDWR)`` on that duplicate (libzmq then sees the
  connection end and closes its own descriptor; we never close it). The total cap sits
  below the descriptor limit with a margin, so libzmq's listener never meets EMFILE:
  libzmq's accept loop keeps a listening socket that failed ``accept`` in its poller
  and retries at once, which spins its I/O thread at 100% CPU while descriptors are
  out (the broker's own loop never sees those attempts).
* :class:`Claims` limits new names per source address per minute and remembers each
  fresh claim until its handshake says hello, so a claim alone cannot squat a name.
* :class:`Refusals` counts what the broker refused a party (a user's requests and
  lines, an address's handshakes): a peer that ignores ``retry_after`` and keeps the
  broker reading and refusing is cut and cools off (refused at ZAP, or cut at accept)
  instead of costing everyone else's latency.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import resource
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator

import zmq
from zmq.utils.monitor import parse_monitor_message

from zchat import protocol as p

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: Largest publication the broker sends (zchat.broker.MAX_PUBLICATION_BYTES, which the
#: broker passes in; this default keeps guard free of an import cycle).
MAX_PUBLICATION_BYTES = 256 * 1024
#: Descriptors kept free of connections at the default total cap: listeners, ZeroMQ's
#: mailboxes and poller, storage files, logs, and connections accepted but not yet cut.
FD_RESERVE = 64
RESERVED_NAMES = ("admin", "root", "system", "zchat")
CLAIM_WINDOW = 60.0  # seconds over which claims per address are counted
MAX_CLAIM_ADDRESSES = 10_000  # addresses whose recent claims are remembered at once
MAX_PENDING_CLAIMS = 10_000  # fresh claims waiting for their hello at once
# Counted connections the guard's thread checks each second: every one about once in
# AUDIT_PERIOD seconds, at least AUDIT_MIN a second. A check is a dup + getpeername
# (about 10-30 us): 512 a second cost an idle broker of 5,000 clients over 1% of a core,
# to repair what only a lost monitor event leaves behind.
AUDIT_PERIOD = 600
AUDIT_MIN = 8
# The thread wakes for the audit only once in AUDIT_EVERY seconds (checking that many
# seconds' worth at once): a wake-up a second, with its list of every connection, was
# most of an idle broker's guard-thread CPU. Events wake it at once whatever this is.
AUDIT_EVERY = 5.0
MAX_GONE = 100_000  # ended request connections waiting for the broker's loop to see them
MAX_REFUSAL_PARTIES = 10_000  # users or addresses whose recent refusals are counted at once

MONITOR_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_ACCEPT_FAILED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
#: A ZMTP server has sent its greeting (64 bytes), WELCOME (10) and READY (30 or more)
#: once a handshake succeeded; one refused or unfinished has sent at most 64 + ERROR.
HANDSHAKE_DONE_BYTES = 96
_TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked in Linux's struct tcp_info (4.1+)


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """Limits at the broker's edge.

    ``queue_budget`` (bytes) bounds each connection's receive queue: ROUTER and PULL
    (and XPUB, for subscriptions) get ``rcvhwm = queue_budget // maxmsgsize`` where
    ``maxmsgsize = 2 * max_bytes``. ``send_budget`` bounds each connection's send queue:
    ROUTER ``sndhwm = send_budget // MAX_REPLY_BYTES`` (a reply is at most 1 MiB), XPUB
    ``sndhwm = send_budget // MAX_PUBLICATION_BYTES`` (a publication is at most 256 KiB),
    and never above ``Limits.pub_hwm``.

    Worst case with the defaults (max_bytes 64 KiB, so maxmsgsize 128 KiB; budgets
    4 MiB in, 16 MiB out): rcvhwm 32, ROUTER sndhwm 16, XPUB sndhwm 64.

    * a ROUTER connection: 32 x 128 KiB in + 16 x 1 MiB out = 4 + 16 = 20 MiB
    * a PULL connection: 32 x 128 KiB in = 4 MiB
    * an XPUB connection: 64 x 256 KiB out + 32 x 128 KiB in (subscriptions) = 16 + 4 = 20 MiB
    * plus libzmq's buffers of any connection: one message being decoded (at most
      maxmsgsize, 128 KiB) and 8 KiB in and out batches: about 0.14 MiB

    So at most 20.2 MiB for one connection, 40.4 MiB for a reference client's two
    (DEALER and SUB). One address (64 connections a port) is bounded at 64 x 44.4 MiB =
    2.8 GiB, and the whole at the total cap ``max_connections`` (default: descriptor
    limit less a reserve, 909 at 1,024 descriptors) x 20.2 MiB = 17.9 GiB. These are
    bounds for peers that never read (a reading client keeps its queues near empty); a
    broker on a small machine lowers send_budget or max_per_address. 16 replies in
    flight per connection: the reference client keeps at most 8 requests on the wire
    (acks and errors share the queue), since a ROUTER drops what does not fit.
    """

    max_per_address: int = 64  # TCP connections from one address on each port
    max_connections: int = 0  # on all ports together; 0: the descriptor limit less a reserve
    claims_per_minute: int = 5  # new names one address may claim per minute (0: no limit)
    claim_timeout: float = 30.0  # seconds a fresh claim has to say hello before it is released
    reserved: tuple[str, ...] = RESERVED_NAMES  # names nobody may claim
    queue_budget: int = 4 * MiB  # bytes a connection's receive queue may hold
    send_budget: int = 16 * MiB  # bytes a connection's send queue may hold
    handshake_timeout: float = 5.0  # seconds a connection has to finish its ZMTP handshake
    # A user refused this many requests and lines within refusal_window (it ignores
    # retry_after) has its connections cut and its keys refused at ZAP for cooloff
    # seconds; an address refused this many handshakes (a tenth as many: each costs a
    # CURVE handshake) has its new connections cut at accept for cooloff. 0: no limit.
    max_refusals: int = 1000
    refusal_window: float = 10.0
    cooloff: float = 60.0

    def rcvhwm(self, maxmsgsize: int) -> int:
        return max(1, self.queue_budget // maxmsgsize)

    def router_sndhwm(self) -> int:
        return max(1, self.send_budget // p.MAX_REPLY_BYTES)

    def xpub_sndhwm(self, pub_hwm: int, publication: int = MAX_PUBLICATION_BYTES) -> int:
        return max(1, min(pub_hwm, self.send_budget // publication))


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (soft, hard) now in force.

    Every TCP connection costs the broker a descriptor; the usual soft limit (1,024)
    is far below what the hard limit allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, want, exc)
    new, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.info("descriptor limit: soft %d (was %d), hard %s", new, soft, "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return new, hard


def connection_cap(config: GuardConfig, fd_soft: int) -> int:
    """The total connection cap: the setting, but always below the descriptor limit."""
    room = max(1, fd_soft - FD_RESERVE - fd_soft // 20)
    if config.max_connections <= 0:
        return room
    if config.max_connections > room:
        log.warning("max-connections %d is above what %d descriptors allow; using %d", config.max_connections, fd_soft, room)
        return room
    return config.max_connections


@contextlib.contextmanager
def _looking_at(fd: int) -> Iterator[socket.socket]:
    """A socket object over libzmq's descriptor ``fd`` that never closes it: a duplicate
    when one can be made, else ``fd`` itself, borrowed and detached. Near the descriptor
    limit (exactly when the guard matters) ``dup`` fails with EMFILE: without the borrow
    every peer looked like address "?" and shared one per-address cap."""
    try:
        dup = os.dup(fd)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        sock = socket.socket(fileno=fd)
        try:
            yield sock
        finally:
            sock.detach()  # never close libzmq's descriptor
        return
    with socket.socket(fileno=dup) as sock:  # closes the duplicate only
        yield sock


def _peer_of(fd: int) -> str | None:
    """The peer address of libzmq's descriptor ``fd`` (None if gone)."""
    peer = peer_name(fd)
    return peer[0] if peer is not None else None


def peer_name(fd: int) -> tuple[str, int] | None:
    """(address, port) of the peer on libzmq's descriptor ``fd`` (None if gone)."""
    try:
        with _looking_at(fd) as sock:
            peer = sock.getpeername()
            return str(peer[0]), int(peer[1])
    except OSError:
        return None


def cut_connection(fd: int) -> None:
    """End the TCP connection on libzmq's ``fd`` (a revoked key's), never closing ``fd``."""
    _cut(fd)


def _handshake_done(fd: int) -> bool:
    """Whether the broker's side of ``fd`` has sent (and had acknowledged) as much as a
    finished ZMTP handshake sends, from the kernel's TCP_INFO (False if unknown)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return False
    try:
        with socket.socket(fileno=dup) as sock:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return False
    if len(info) < _TCPI_BYTES_ACKED + 8:
        return False
    return int(struct.unpack_from("Q", info, _TCPI_BYTES_ACKED)[0]) >= HANDSHAKE_DONE_BYTES


def _cut(fd: int) -> None:
    """End the TCP connection under libzmq's ``fd`` without closing that descriptor."""
    try:
        with _looking_at(fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class ConnectionGuard:
    """Counts TCP connections per address on the broker's sockets and cuts the excess.

    Runs in its own thread, which alone uses the monitor sockets; it ends when the
    context is terminated (so the broker's ``ctx.term()`` is never kept waiting).
    Counters are plain ints and dicts read by the broker's thread for reports only.
    """

    def __init__(self, ctx: zmq.Context, config: GuardConfig, total_cap: int) -> None:
        self.ctx = ctx
        self.config = config
        self.total_cap = total_cap
        self.pending_cap = max(1, total_cap // 2)  # half stays for connections that finished their handshake
        self.monitors: list[tuple[str, zmq.Socket]] = []
        self.by_fd: dict[tuple[str, int], str] = {}  # (port label, fd) -> address
        self.per_address: dict[tuple[str, str], int] = {}  # (port label, address) -> connections
        # Accepted connections that may still be in their handshake, oldest first, with
        # the time they came. libzmq's monitor says that *a* handshake succeeded but not
        # which, so the table is cleaned when it is full (see _make_room).
        self.pending: dict[tuple[str, int], float] = {}
        self.cut: dict[str, int] = {"address": 0, "total": 0, "handshakes": 0, "cooling": 0}
        # Addresses cooling off (set by the broker's thread): their connections are cut
        # at accept until the time given, before a CURVE handshake costs anything.
        self.barred: dict[str, float] = {}
        self.accept_failed = 0
        self.mechanism_mismatch = 0  # handshakes that spoke another mechanism (a zchat from before CURVE)
        self._last_mismatch_log = -1e9
        self._last_warn = 0.0
        self._audit_at = 0
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        # Descriptors of request (ROUTER) connections that ended, for the broker's loop,
        # which takes the sessions on them offline at once (zchat.broker.liveness);
        # on_gone (set by the broker) wakes that loop from this thread.
        self.gone: deque[int] = deque(maxlen=MAX_GONE)
        self.on_gone = None

    @property
    def total(self) -> int:
        return len(self.by_fd)

    def count(self, address: str, label: str | None = None) -> int:
        """Connections from ``address`` now (on one port, or on all)."""
        if label is not None:
            return self.per_address.get((label, address), 0)
        return sum(n for (_, addr), n in list(self.per_address.items()) if addr == address)

    def watch(self, label: str, sock: zmq.Socket) -> None:
        """Monitor ``sock`` (call before ``start``, from the thread that owns ``sock``)."""
        monitor = sock.get_monitor_socket(MONITOR_EVENTS)
        monitor.linger = 0
        self.monitors.append((label, monitor))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zchat-guard", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        labels = {}
        for label, monitor in self.monitors:
            poller.register(monitor, zmq.POLLIN)
            labels[monitor] = label
        self.ready.set()
        stopped = 0
        next_audit = time.monotonic() + AUDIT_EVERY
        try:
            while stopped < len(self.monitors):
                try:
                    ready = poller.poll(max(1, int(1000 * (next_audit - time.monotonic())) + 1))
                except zmq.ContextTerminated:
                    return
                if time.monotonic() >= next_audit:  # also while events keep coming
                    self.audit(int(AUDIT_EVERY * max(AUDIT_MIN, -(-len(self.by_fd) // AUDIT_PERIOD))))
                    next_audit = time.monotonic() + AUDIT_EVERY
                for monitor, _ in ready:
                    for _ in range(1000):
                        try:
                            frames = monitor.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        event = parse_monitor_message(frames)
                        if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                            stopped += 1
                            poller.unregister(monitor)
                            break
                        self.on_event(labels[monitor], int(event["event"]), int(event["value"]), time.monotonic())
        except zmq.ContextTerminated:
            return
        except Exception:  # pragma: no cover - the guard must never take the broker down
            log.exception("connection guard failed; connections are no longer counted")
        finally:
            for _, monitor in self.monitors:
                monitor.close(linger=0)

    def on_event(self, label: str, kind: int, fd: int, now: float) -> None:
        key = (label, fd)
        if kind == zmq.EVENT_ACCEPTED:
            self._forget(key)  # a descriptor reused before its disconnect was seen
            address = _peer_of(fd) or "?"
            self.by_fd[key] = address
            slot = (label, address)
            self.per_address[slot] = self.per_address.get(slot, 0) + 1
            self.pending[key] = now
            reason = ""
            if self.barred and self.barred.get(address, 0.0) > now:
                reason = "cooling"
            elif self.per_address[slot] > self.config.max_per_address:
                reason = "address"
            elif len(self.by_fd) > self.total_cap:
                reason = "total"
            if reason:
                self.cut[reason] += 1
                del self.pending[key]
                _cut(fd)
                why = "cooling off after too many refused handshakes" if reason == "cooling" else f"over the {reason} cap"
                self._warn(now, f"cut a {label} connection from {address} ({why}; {self.per_address[slot]} from it, {len(self.by_fd)} in all)")
            elif len(self.pending) > self.pending_cap:
                self._make_room(now)
            else:
                log.debug("%s connection from %s (fd %d; %d from it, %d in all)", label, address, fd, self.per_address[slot], len(self.by_fd))
        elif kind == zmq.EVENT_DISCONNECTED:
            self._forget(key)
            if label == "requests":
                self.gone.append(fd)
                if self.on_gone is not None:
                    self.on_gone()
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            # ``fd`` holds the protocol error here. No body ever reaches such a client: it
            # sees the same failure on its side and retries; say why once a minute.
            if fd == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                self.mechanism_mismatch += 1
                if now - self._last_mismatch_log >= 60.0:
                    self._last_mismatch_log = now
                    log.warning(
                        "%s: a client spoke another security mechanism than this broker's (%d so far): a zchat "
                        "from before CURVE (PLAIN) cannot connect; it must be upgraded (docs/protocol.md §13)",
                        label, self.mechanism_mismatch,
                    )
        elif kind == zmq.EVENT_ACCEPT_FAILED:
            self.accept_failed += 1
            self._warn(now, f"{label}: accept failed ({os.strerror(fd) if fd > 0 else fd}); {len(self.by_fd)} connections")
            if fd in (errno.EMFILE, errno.ENFILE) and self.pending:  # out of descriptors: free one for whoever waits
                self._make_room(now)

    def bar(self, address: str, until: float) -> None:
        """Cut ``address``'s new connections at accept until ``until`` (monotonic); called
        by the broker's thread (a dict store is atomic; expired entries go here)."""
        now = time.monotonic()
        if len(self.barred) >= MAX_REFUSAL_PARTIES:
            self.barred = {a: t for a, t in self.barred.items() if t > now}
        if len(self.barred) < MAX_REFUSAL_PARTIES:
            self.barred[address] = until

    def audit(self, limit: int) -> int:
        """Uncount up to ``limit`` connections whose descriptor is gone (a lost monitor
        event must not leave an address counted for ever); return how many."""
        keys = list(self.by_fd)
        if not keys:
            return 0
        start = self._audit_at % len(keys)
        chunk = (keys[start:] + keys[:start])[:limit]
        self._audit_at = start + len(chunk)
        gone = 0
        for key in chunk:
            if _peer_of(key[1]) != self.by_fd.get(key):
                self._forget(key)
                gone += 1
        if gone:
            log.info("audit: %d connection(s) had ended unseen", gone)
        return gone

    def _make_room(self, now: float) -> None:
        """The handshake table is full: drop the entries that finished their handshake
        and cut the oldest one that did not, so idle connections cannot keep a newcomer
        from the few milliseconds its handshake needs."""
        stale = now - self.config.handshake_timeout - 1.0  # libzmq has ended those still unfinished
        for _ in range(min(len(self.pending), 256)):
            key, since = next(iter(self.pending.items()))
            del self.pending[key]
            if since < stale or _handshake_done(key[1]):
                continue
            self.cut["handshakes"] += 1
            _cut(key[1])
            self._warn(now, f"cut the oldest unfinished handshake (from {self.by_fd.get(key)}); {len(self.pending)} in their handshake")
            return

    def _forget(self, key: tuple[str, int]) -> None:
        address = self.by_fd.pop(key, None)
        self.pending.pop(key, None)
        if address is None:
            return
        slot = (key[0], address)
        left = self.per_address.get(slot, 0) - 1
        if left > 0:
            self.per_address[slot] = left
        else:
            self.per_address.pop(slot, None)

    def _warn(self, now: float, text: str) -> None:
        if now - self._last_warn >= 1.0:  # at most one line a second: a flood must not flood the log
            self._last_warn = now
            log.warning("%s (cut so far: %s, accept failures: %d)", text, self.cut, self.accept_failed)


class Claims:
    """New names per source address per minute, and fresh claims awaiting their hello.

    Sans I/O: the broker passes the time. Both tables are bounded; when either is full
    new claims are refused (names already owned keep working).
    """

    def __init__(self, per_minute: int, timeout: float) -> None:
        self.per_minute = per_minute
        self.timeout = timeout
        self.recent: dict[str, deque[float]] = {}  # address -> times of its claims in the window
        self.pending: dict[str, tuple[float, bytes]] = {}  # name -> (deadline, digest)

    def wait(self, address: str, now: float) -> float:
        """0.0 if ``address`` may claim a name now, else seconds until it may."""
        if len(self.pending) >= MAX_PENDING_CLAIMS:
            return self.timeout
        if self.per_minute <= 0:
            return 0.0
        times = self.recent.get(address)
        if times is None:
            if len(self.recent) >= MAX_CLAIM_ADDRESSES:
                self._prune(now)
                if len(self.recent) >= MAX_CLAIM_ADDRESSES:
                    return CLAIM_WINDOW
            return 0.0
        while times and times[0] <= now - CLAIM_WINDOW:
            times.popleft()
        if len(times) < self.per_minute:
            return 0.0
        return max(0.01, times[0] + CLAIM_WINDOW - now)

    def claimed(self, address: str, name: str, digest: bytes, now: float) -> None:
        if self.per_minute > 0:
            self.recent.setdefault(address, deque(maxlen=self.per_minute)).append(now)
        self.pending[name] = (now + self.timeout, digest)

    def due(self, now: float) -> list[tuple[str, bytes]]:
        """Claims past their deadline, removed from the table: the caller decides each."""
        if not self.pending:
            return []
        late = [(name, digest) for name, (deadline, digest) in self.pending.items() if deadline <= now]
        for name, _ in late:
            del self.pending[name]
        if len(self.recent) > MAX_CLAIM_ADDRESSES // 2:
            self._prune(now)
        return late

    def _prune(self, now: float) -> None:
        old = now - CLAIM_WINDOW
        for address in [a for a, times in self.recent.items() if not times or times[-1] <= old]:
            del self.recent[address]


class Refusals:
    """Refusals per party (a user name, a source address) in a fixed window; a party
    past ``limit`` cools off for ``cooloff`` seconds.

    A refusal that says ``retry_after`` counts only when it comes before the party's
    previous ``retry_after`` ran out: the party ignored what it was told. So a heavy
    user that waits as told is never counted however often it is refused, while a
    peer that floods draws thousands a second. Refusals without one (bad input,
    handshakes refused) always count. A refusal weighs what the refused line would have
    cost (``weight``: its tokens, one per started 4 KiB, as ``zchat.core.limits.line_cost``),
    so a flood of 32 KB lines is cut after 125 of them (4 MB read and decrypted), not 1,000
    (32 MB). Sans I/O: the broker passes the time and carries out the cut. The tables are
    bounded (MAX_REFUSAL_PARTIES); when full, the oldest go.
    """

    GRACE = 0.005  # seconds early a retry may come (clock and timer granularity)

    def __init__(self, limit: int, window: float, cooloff: float) -> None:
        self.limit = limit
        self.window = window
        self.cooloff = cooloff
        self.counts: dict[str, list[float]] = {}  # party -> [window start, refusals in it]
        self.told: dict[str, float] = {}  # party -> when its last retry_after runs out
        self.cooling: dict[str, float] = {}  # party -> monotonic time its cool-off ends
        self.cuts = 0  # parties cut so far

    def refused(self, party: str, now: float, retry_after: float = 0.0, weight: float = 1.0) -> bool:
        """Note one refusal weighing ``weight``; True exactly when ``party`` crosses the
        limit (it cools off from now: the caller cuts it and logs that once)."""
        if self.limit <= 0:
            return False
        if retry_after > 0:
            told = self.told.get(party, 0.0)
            if len(self.told) >= MAX_REFUSAL_PARTIES and party not in self.told:
                self.told = {k: t for k, t in self.told.items() if t > now}
                while len(self.told) >= MAX_REFUSAL_PARTIES:
                    del self.told[next(iter(self.told))]
            self.told[party] = now + retry_after
            if now + self.GRACE >= told:
                return False  # it waited as told (or this is its first refusal)
        entry = self.counts.get(party)
        if entry is None or now - entry[0] >= self.window:
            if entry is None and len(self.counts) >= MAX_REFUSAL_PARTIES:
                self._prune(now)
            entry = self.counts[party] = [now, 0.0]
        before = entry[1]
        entry[1] = before + weight
        if not before < self.limit <= entry[1]:
            return False
        if len(self.cooling) >= MAX_REFUSAL_PARTIES:
            self.cooling = {k: t for k, t in self.cooling.items() if t > now}
            while len(self.cooling) >= MAX_REFUSAL_PARTIES:
                del self.cooling[next(iter(self.cooling))]
        self.cooling[party] = now + self.cooloff
        self.cuts += 1
        return True

    def left(self, party: str, now: float) -> float:
        """Seconds ``party`` still cools off (0.0: it does not)."""
        until = self.cooling.get(party)
        if until is None:
            return 0.0
        if until <= now:
            del self.cooling[party]
            return 0.0
        return until - now

    def _prune(self, now: float) -> None:
        self.counts = {k: e for k, e in self.counts.items() if now - e[0] < self.window}
        while len(self.counts) >= MAX_REFUSAL_PARTIES:
            del self.counts[next(iter(self.counts))]
