"""One ZeroMQ socket served from event-loop callbacks (the client has two: a DEALER
and a SUB): reads drained as they come, writes handed over through ``submit()``."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio

from zchat import protocol as p
from zchat.sockio import NOBLOCK, readable, recv_parts

log = logging.getLogger(__package__)  # one logger for the whole library: "zchat.client"


class _Pump:
    """Owns one socket: runs queued operations on it and hands received frames on.

    Everything runs in event-loop callbacks on the loop's thread, never in parallel:
    the socket's ZMQ_FD readiness, ``submit()`` (scheduled with call_soon) and a
    one-second safety timer all call ``_service``. The FD is edge-triggered, so each
    pass reads until ZMQ_EVENTS says nothing is left (a send of ours can consume the
    edge). No task sits between a frame's arrival and its handler.
    """

    def __init__(self, sock: zmq.asyncio.Socket, on_recv: Callable[[list[bytes]], None] | None) -> None:
        self.sync = zmq.Socket.shadow(sock.underlying)
        self.on_recv = on_recv
        self.ops: collections.deque[Callable[[zmq.Socket], None]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._closed = False
        self._fd: int | None = None
        self.paused = False  # reads held back (the caller is behind): libzmq's queue, then the sender's, fill

    def submit(self, op: Callable[[zmq.Socket], None]) -> None:
        self.ops.append(op)
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._service)

    def send_now(self, data: bytes) -> bool:
        """Send at once if nothing queued must go first (order is kept); False if it
        cannot, and then the caller queues it. Runs on the loop's thread like the rest."""
        if self.ops or self._scheduled or self._loop is None or self._closed:
            return False  # (scheduled: a pass is due this turn, e.g. after an earlier send_now)
        try:
            self.sync.send(data, NOBLOCK)
        except zmq.Again:
            return False
        self._scheduled = True  # the send may have consumed the FD's edge: look again soon
        self._loop.call_soon(self._service)
        return True

    async def run(self) -> None:
        """Serve the socket until cancelled."""
        loop = self._loop = asyncio.get_running_loop()
        fd = self._fd = self.sync.getsockopt(zmq.FD) if self.on_recv is not None else None
        safety: asyncio.TimerHandle | None = None

        def recheck() -> None:  # one standing timer, not one per wait
            nonlocal safety
            self._service()
            safety = loop.call_later(1.0, recheck)

        if fd is not None:
            loop.add_reader(fd, self._service)
            safety = loop.call_later(1.0, recheck)
        self._service()  # whatever was submitted before the loop was known
        try:
            await loop.create_future()  # forever: the callbacks do the work
        finally:
            if safety is not None:
                safety.cancel()
            self.stop()

    def pause(self) -> None:
        """Stop reading (operations still run) until ``resume()``."""
        self.paused = True

    def resume(self) -> None:
        """Read again, starting in a callback of its own."""
        if self.paused:
            self.paused = False
            if not self._scheduled and self._loop is not None:
                self._scheduled = True
                self._loop.call_soon(self._service)

    def stop(self) -> None:
        """Stop serving the socket now (before it is closed): no callback touches it after."""
        if not self._closed:
            self._closed = True
            if self._fd is not None and self._loop is not None:
                self._loop.remove_reader(self._fd)

    def _service(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        ops = self.ops
        while ops:
            op = ops.popleft()
            try:
                op(self.sync)
            except zmq.Again:
                log.debug("socket full; the operation will be retried by its owner")
        if self.on_recv is not None and not self.paused and self._drain() and not self._scheduled:
            self._scheduled = True  # more is queued: carry on after others had a turn
            self._loop.call_soon(self._service)  # type: ignore[union-attr]

    def _drain(self) -> bool:
        """Read what is queued (a bounded amount); True if more is left."""
        sync, deliver = self.sync, self._deliver
        for _ in range(1000):
            if self.paused or not readable(sync):  # (a handler may pause it)
                return False
            try:
                frames = recv_parts(sync)
            except zmq.Again:
                return False
            deliver(frames)
        return not self.paused

    def _deliver(self, frames: list[bytes]) -> None:
        try:
            self.on_recv(frames)  # type: ignore[misc]
        except p.ProtocolError as exc:
            log.warning("ignored a malformed message from the broker: %s", exc)
        except Exception:  # a bug in a handler must not stop the socket being served
            log.exception("failed to handle a message from the broker")
