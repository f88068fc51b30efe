"""One browser tab's WebSocket: frames out in order, within a budget of bytes.

Every frame for a user's tabs is encoded once and pushed to each tab. A tab that reads
slower than its user's chat arrives (a phone on a bad link, a background tab the
browser throttles) would make the gateway hold an ever-growing queue for it. Instead
its queue has a byte budget: past it the tab is closed (code 4008, "too slow"). The
page reconnects at once with the last seq it holds per room and gets exactly what it
missed from history (see UserHub.attach), so dropping a tab loses nothing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref

from aiohttp import WSMsgType, web

from zchat.web.wire import framed

log = logging.getLogger(__name__)

#: Bytes (characters of JSON text, near enough) one tab's unsent frames may hold.
QUEUE_BYTES = 1024 * 1024
#: The least budget a tab may be given: four frames (zchat.web.wire.FRAME_LIMIT) and more.
MIN_QUEUE_BYTES = 256 * 1024
#: Bytes a tab's burst (frames written together at the end of a loop pass) may hold: more
#: goes through the writer task, which waits for the socket to drain.
BURST_BYTES = 64 * 1024
#: Lines one tab may have sent that the broker has not confirmed yet.
MAX_IN_FLIGHT = 256

CLOSE_TOO_SLOW = 4008
CLOSE_SIGNED_OUT = 4001
CLOSE_TOO_MANY = 4003
CLOSE_GONE = 4004  # the user's connection to the broker closed (e.g. their key was revoked)


class _Flusher:
    """One callback a loop pass that writes every tab's burst (not one per tab: a line
    into a room of 500 web users is 500 bursts)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.tabs: list[Tab] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Flusher:
        flusher = _FLUSHERS.get(loop)
        if flusher is None:
            flusher = _FLUSHERS[loop] = cls(loop)
        return flusher

    def add(self, tab: Tab) -> None:
        if not self.tabs:
            self.loop.call_soon(self.run)
        self.tabs.append(tab)

    def run(self) -> None:
        tabs, self.tabs = self.tabs, []
        for tab in tabs:
            try:
                tab._flush()
            except Exception:  # one tab's broken socket must not keep the others' frames
                log.exception("writing a tab's frames failed")
                tab.drop(CLOSE_GONE, "connection lost")


_FLUSHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flusher] = weakref.WeakKeyDictionary()


class Tab:
    """The gateway's end of one tab's WebSocket (one per page load).

    Two ways out, in one order. The usual one: a frame pushed while nothing waits for
    the socket (the writer idle, the transport's buffer empty) joins the tab's burst,
    written with one ``transport.write`` at the end of the loop's pass: no task switch
    per delivery, one system call per tab for all the frames of a pass. A burst starts
    only when the transport holds nothing and is at most BURST_BYTES, so it cannot
    grow a slow reader's buffer. Otherwise (the reader is behind, or a replay) frames
    wait in the queue for the writer task, which sends them with aiohttp and waits for
    the socket to drain. The byte budget counts the queue and the burst."""

    def __init__(
        self, ws: web.WebSocketResponse, session_key: str, queue_bytes: int = QUEUE_BYTES,
        transport: asyncio.Transport | None = None,
    ) -> None:
        self.ws = ws
        self.session_key = session_key
        self.queue_bytes = max(queue_bytes, MIN_QUEUE_BYTES)
        self.transport = transport  # the request's: None sends everything through the writer task
        self.in_flight = 0  # sends not confirmed yet
        self.requests = 0  # other requests running
        self.closed = False
        self._queue: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._sending = False  # the writer task is sending from the queue
        self._burst: list[bytes] = []  # frames (with their headers) for the end of this pass
        self._burst_size = 0
        self._wake = asyncio.Event()
        self._low = asyncio.Event()  # set while the queue is at most a quarter full
        self._low.set()
        self._flusher = _Flusher.of(asyncio.get_running_loop())
        self._writer = asyncio.ensure_future(self._write())

    def push(self, text: str) -> bool:
        """Queue a frame; False (and the tab is dropped) when over its byte budget."""
        return self.send(text.encode())

    def send(self, data: bytes, whole: bytes | None = None) -> bool:
        """Queue a frame given as UTF-8 JSON (shared by every tab it goes to; ``whole``:
        the same with its WebSocket header, ``framed(data)``, made once for them all);
        False (and the tab is dropped) when over its byte budget."""
        if self.closed:
            return False
        if self._size + self._burst_size + len(data) > self.queue_bytes:
            log.info("dropping a tab that reads too slowly (%d bytes queued)", self._size + self._burst_size)
            self.drop(CLOSE_TOO_SLOW, "too slow: reconnect and catch up")
            return False
        # Into the burst only while nothing older waits in the queue: the burst is written
        # first (by the flusher, or by the writer before its queue), so a frame that fits
        # it after a bigger one was queued would overtake that one.
        if self._burst_size + len(data) <= BURST_BYTES and not self._queue and (self._burst or self._idle()):
            if not self._burst:
                self._flusher.add(self)
            self._burst.append(whole or framed(data))
            self._burst_size += len(data)
            return True
        self._queue.append(data)
        self._size += len(data)
        if self._size > self.queue_bytes // 4:
            self._low.clear()
        self._wake.set()
        return True

    def _idle(self) -> bool:
        """Nothing waits to go out: not in the queue, not in the transport (its reader keeps up)."""
        return self.transport is not None and not self._queue and not self._sending and not self.transport.get_write_buffer_size()

    def _flush(self) -> None:
        """Write this pass's frames in one go, before anything queued after them."""
        if not self._burst:
            return
        burst, self._burst, self._burst_size = self._burst, [], 0
        if self.closed or self.ws.closed or self.transport is None or self.transport.is_closing():
            return  # going away: the page catches up when it reconnects
        self.transport.write(burst[0] if len(burst) == 1 else b"".join(burst))

    async def drained(self) -> None:
        """Wait until the queue is at most a quarter full (or the tab closed): a replay
        from history goes page by page at the tab's own pace, within its budget."""
        await self._low.wait()

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                self._flush()  # a burst begun before these frames goes first
                self._sending = True
                while self._queue:
                    data = self._queue.popleft()
                    self._size -= len(data)
                    if self._size <= self.queue_bytes // 4:
                        self._low.set()
                    await self.ws.send_frame(data, WSMsgType.TEXT)
                self._sending = False
        except (ConnectionError, RuntimeError) as exc:  # the socket went away under us
            log.debug("tab writer stopped: %s", exc)
            self.drop(CLOSE_GONE, "connection lost")

    def drop(self, code: int, reason: str) -> None:
        """Close the tab now; its frames still queued are forgotten (it catches up)."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._burst.clear()
        self._size = self._burst_size = 0
        self._low.set()
        self._writer.cancel()
        asyncio.ensure_future(self.ws.close(code=code, message=reason.encode()))

    async def finish(self) -> None:
        """The tab's socket ended: stop its writer."""
        self.closed = True
        self._low.set()
        self._writer.cancel()
        try:
            await self._writer
        except asyncio.CancelledError:
            pass  # the usual end: we cancelled it
