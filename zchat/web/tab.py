"""One browser tab's WebSocket: a send queue bounded in bytes, written by one task.

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

from aiohttp import web

log = logging.getLogger(__name__)

#: Bytes (characters of JSON text, near enough) one tab's unsent frames may hold.
QUEUE_BYTES = 1024 * 1024
#: The least budget a tab may be given: four frames (zchat.web.wire.FRAME_LIMIT) and more.
MIN_QUEUE_BYTES = 256 * 1024
#: Lines one tab may have sent that the broker has not confirmed yet.
MAX_IN_FLIGHT = 256

CLOSE_TOO_SLOW = 4008
CLOSE_SIGNED_OUT = 4001
CLOSE_TOO_MANY = 4003
CLOSE_GONE = 4004  # the user's connection to the broker closed (e.g. their key was revoked)


class Tab:
    """The gateway's end of one tab's WebSocket (one per page load)."""

    def __init__(self, ws: web.WebSocketResponse, session_key: str, queue_bytes: int = QUEUE_BYTES) -> None:
        self.ws = ws
        self.session_key = session_key
        self.queue_bytes = max(queue_bytes, MIN_QUEUE_BYTES)
        self.in_flight = 0  # sends not confirmed yet
        self.requests = 0  # other requests running
        self.closed = False
        self._queue: collections.deque[str] = collections.deque()
        self._size = 0
        self._wake = asyncio.Event()
        self._low = asyncio.Event()  # set while the queue is at most a quarter full
        self._low.set()
        self._writer = asyncio.ensure_future(self._write())

    def push(self, text: str) -> bool:
        """Queue a frame; False (and the tab is dropped) when over its byte budget."""
        if self.closed:
            return False
        if self._size + len(text) > self.queue_bytes:
            log.info("dropping a tab that reads too slowly (%d bytes queued)", self._size)
            self.drop(CLOSE_TOO_SLOW, "too slow: reconnect and catch up")
            return False
        self._queue.append(text)
        self._size += len(text)
        if self._size > self.queue_bytes // 4:
            self._low.clear()
        self._wake.set()
        return True

    async def drained(self) -> None:
        """Wait until the queue is at most a quarter full (or the tab closed): a replay
        from history goes page by page at the tab's own pace, within its budget."""
        await self._low.wait()

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    text = self._queue.popleft()
                    self._size -= len(text)
                    if self._size <= self.queue_bytes // 4:
                        self._low.set()
                    await self.ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:  # the socket went away under us
            log.debug("tab writer stopped: %s", exc)
            self.drop(CLOSE_GONE, "connection lost")

    def drop(self, code: int, reason: str) -> None:
        """Close the tab now; its frames still queued are forgotten (it catches up)."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._size = 0
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
