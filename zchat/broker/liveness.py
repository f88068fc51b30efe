"""Sessions end with their connection: which request (ROUTER) connection each session
speaks on, and closing its session soon after the connection guard's monitor says that
connection ended (a client killed, its socket closed, TCP keepalive gave up on a machine
that vanished). Application pings stay as the bound for a connection that stays open
but silent (3 x heartbeat).

A session whose connection ended is given GRACE seconds: a DEALER that reconnects by
itself with the same routing id (its session id) and speaks again keeps its session,
as before. A descriptor number is reused by the next connection as soon as it is free,
so a session also remembers its connection's peer (address, port): speaking from the
same descriptor number with another peer is a new connection, not the dead one.
"""

from __future__ import annotations

import collections
import logging

import zmq

from zchat import protocol as p
from zchat.core import Outcome
from zchat.guard import peer_name

log = logging.getLogger(__package__)  # one logger for the whole broker: "zchat.broker"

GRACE = 3.0  # seconds a session outlives its ended connection, waiting for its DEALER to reconnect
MAX_HELD = 10_000  # pongs held for the tick at most: past that they go at once

Peer = tuple[str, int] | None


class Liveness:
    """Session-to-connection bookkeeping (a mixin of Broker)."""

    def _liveness_init(self) -> None:
        # sid -> (fd, peer) of the connection it last spoke on; fd -> {sid: peer}.
        # Bounded by the connections the guard admits: one routing id per connection;
        # entries leave when their connection ends (or, past 2x the sessions, at a prune).
        self.conn_of: dict[str, tuple[int, Peer]] = {}
        self.on_fd: dict[int, dict[str, Peer]] = {}
        # Sessions whose connection ended: sid -> (fd, peer) of that connection, with
        # their deadlines in order (GRACE is constant). At most one entry per session.
        self.dying: dict[str, tuple[int, Peer]] = {}
        self.dying_due: collections.deque[tuple[float, str]] = collections.deque()
        # Pongs to lazy pings (heartbeats), held until a turn that replies anyway or
        # the tick; at most MAX_HELD.
        self.held: list[tuple[str, p.Reply]] = []

    def _hold_pongs(self, out: Outcome) -> None:
        """Hold this turn's pongs to lazy pings (protocol: Ping.lazy) for the tick, unless
        the turn replies anyway. A reply to an idle connection wakes libzmq's I/O thread
        (an eventfd write, and a wake-up on its side): about a third of what an idle
        heartbeat cost the broker. Sent together, they share one wake-up, and a turn
        that sends nothing needs no second pass to ask the ROUTER again."""
        held = self.held
        if out.later is not None:
            held += out.later
            out.later = None
        if out.replies or out.acks or len(held) >= MAX_HELD:
            out.replies += held
            held.clear()

    def _release_pongs(self, out: Outcome) -> None:
        """The tick: the held pongs go out (each waited at most one tick)."""
        if self.held:
            out.replies += self.held
            self.held.clear()

    def _seen_on(self, sid: str, frame: zmq.Frame) -> None:
        """``sid`` spoke on the connection ``frame`` came from: remember it (a few dict
        operations when nothing changed; a getpeername when the connection is new)."""
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return
        known = self.conn_of.get(sid)
        if self.dying and sid in self.dying:  # it spoke again: on a new connection?
            dead_fd, dead_peer = self.dying[sid]
            if fd == dead_fd and peer_name(fd) == dead_peer:
                return  # a frame the dead connection left queued
            del self.dying[sid]
            known = None
        if known is not None and known[0] == fd:
            return
        if known is not None:
            self._unmap(sid, known[0])
        peer = peer_name(fd)
        self.conn_of[sid] = (fd, peer)
        self.on_fd.setdefault(fd, {})[sid] = peer
        if len(self.conn_of) > 2 * len(self.core.sessions) + 1024:  # type: ignore[union-attr]
            for old in [s for s in self.conn_of if s not in self.core.sessions]:  # type: ignore[union-attr]
                self._unmap(old, self.conn_of.pop(old)[0])

    def _unmap(self, sid: str, fd: int) -> None:
        held = self.on_fd.get(fd)
        if held is not None:
            held.pop(sid, None)
            if not held:
                del self.on_fd[fd]

    def _connections_gone(self, now: float, out: Outcome) -> None:
        """Sessions on request connections the guard saw end start their GRACE; those
        whose GRACE is over and that did not speak on a new connection are closed."""
        gone = self.guard.gone  # type: ignore[union-attr]
        while gone:
            fd = gone.popleft()
            for sid, peer in (self.on_fd.pop(fd, None) or {}).items():
                self.conn_of.pop(sid, None)
                if sid not in self.dying:
                    self.dying[sid] = (fd, peer)
                    self.dying_due.append((now + GRACE, sid))
        core = self.core
        assert core is not None
        closed = 0
        due = self.dying_due
        while due and due[0][0] <= now:
            _, sid = due.popleft()
            if self.dying.pop(sid, None) is not None:
                closed += core.disconnected(sid, now, out)
        if closed:
            log.info("%d session(s) closed: their connection ended", closed)
