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
"""

from __future__ import annotations

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
MAX_GONE = 100_000  # ended request connections waiting for the broker's loop to see them

MONITOR_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_ACCEPT_FAILED | zmq.EVENT_DISCONNECTED
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


def _peer_of(fd: int) -> str | None:
    """The peer address of libzmq's descriptor ``fd``, looked at through a duplicate."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        with socket.socket(fileno=dup) as sock:  # closes the duplicate only
            return str(sock.getpeername()[0])
    except OSError:
        return None


def peer_name(fd: int) -> tuple[str, int] | None:
    """(address, port) of the peer on libzmq's descriptor ``fd`` (None if gone)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        with socket.socket(fileno=dup) as sock:
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
        dup = os.dup(fd)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            return
        sock = socket.socket(fileno=fd)  # no descriptor left for a duplicate: borrow it
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()  # never close libzmq's descriptor
        return
    try:
        with socket.socket(fileno=dup) as sock:
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
        self.cut: dict[str, int] = {"address": 0, "total": 0, "handshakes": 0}
        self.accept_failed = 0
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
        next_audit = time.monotonic() + 1.0
        try:
            while stopped < len(self.monitors):
                try:
                    ready = poller.poll(1000)
                except zmq.ContextTerminated:
                    return
                if time.monotonic() >= next_audit:  # also while events keep coming
                    self.audit(max(AUDIT_MIN, -(-len(self.by_fd) // AUDIT_PERIOD)))
                    next_audit = time.monotonic() + 1.0
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
            if self.per_address[slot] > self.config.max_per_address:
                reason = "address"
            elif len(self.by_fd) > self.total_cap:
                reason = "total"
            if reason:
                self.cut[reason] += 1
                del self.pending[key]
                _cut(fd)
                self._warn(now, f"cut a {label} connection from {address} (over the {reason} cap; {self.per_address[slot]} from it, {len(self.by_fd)} in all)")
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
        elif kind == zmq.EVENT_ACCEPT_FAILED:
            self.accept_failed += 1
            self._warn(now, f"{label}: accept failed ({os.strerror(fd) if fd > 0 else fd}); {len(self.by_fd)} connections")

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

