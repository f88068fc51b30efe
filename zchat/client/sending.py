"""Sending chat lines: post and send, one cid per line, acks, and resends until the
broker acks (it drops the duplicates)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from zchat import protocol as p
from zchat.client.events import ClientError
from zchat.sockio import NOBLOCK

#: Send refusals that keep the line pending, resent after ack_timeout (nothing was stored).
_RESEND = frozenset({p.ErrorCode.INTERNAL, p.ErrorCode.STORAGE_UNAVAILABLE})


class _Pending(msgspec.Struct):
    """One line until acked: its encoded Send (resent as is), what settles it (a post's
    future, or the _Group of a post_many with the line's place ``at`` in it), when it
    last went. A Struct: made per line, and half the cost of a class with __slots__."""

    data: bytes
    future: Any  # asyncio.Future | _Group
    sent: float
    at: int = -1


class _Group:
    """The lines of one ``post_many``: one future for all of them instead of one each
    (a future costs about as much as encoding the line). Duck-types the parts of a
    future that pending lines use (``done``, ``set_exception``)."""

    __slots__ = ("future", "left", "results")

    def __init__(self, future: asyncio.Future, count: int) -> None:
        self.future = future
        self.results: list[p.Stored | ClientError | None] = [None] * count
        self.left = count

    def done(self) -> bool:
        return self.future.done()

    def settle(self, at: int, outcome: p.Stored | ClientError) -> None:
        """Line ``at`` is stored or refused; the future resolves once every line is."""
        results = self.results
        if results[at] is None:
            results[at] = outcome
            self.left -= 1
            if not self.left and not self.future.done():
                self.future.set_result(results)

    def set_exception(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Sending:
    """Chat lines out (a mixin of Client): each pending until acked."""

    # ------------------------------------------------------------ sending

    async def send(self, room: str, text: str, *, me: bool = False, timeout: float | None = None) -> p.Stored:
        """Send to a room; returns once the broker has stored it (resending until then)."""
        return await self._wait(self.post(room, text, me=me), timeout)

    async def send_dm(self, to: str, text: str, *, me: bool = False, timeout: float | None = None) -> p.Stored:
        """Send a direct message that only ``to`` (and your other devices) receive."""
        return await self._wait(self.post_dm(to, text, me=me), timeout)

    def post(self, room: str, text: str, *, me: bool = False) -> asyncio.Future:
        """Queue a send without awaiting it: a future of its Stored (for bulk senders;
        no coroutine or task per message). Resent until acked, like ``send``. Lines
        posted in one turn of the event loop travel to the broker in one frame."""
        return self._submit(room, "", text, me)

    def post_dm(self, to: str, text: str, *, me: bool = False) -> asyncio.Future:
        return self._submit("", to, text, me)

    def post_many(self, room: str, texts: Sequence[str], *, me: bool = False) -> asyncio.Future:
        """Queue several lines to ``room`` with one future for them all (for bulk senders:
        a bridge's backlog, a paste, the benchmark): it resolves, once every line is
        settled, to a list in the order given, each item the line's ``Stored`` or the
        ``ClientError`` that refused it. Each line has its own cid and is resent until
        acked, as with ``post``; they travel in as few frames as the limits allow.

        A line over the size limit raises ClientError ``too_large`` and queues none of
        them. Cancelling the future (or giving up on it) stops the resending, as for
        ``send``: lines already on their way may still be stored."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not texts:
            fut.set_result([])
            return fut
        limit, encode = self.max_bytes, p.send_encoder(self.sid, room, me=me)
        base, first_count = self._cid_base, self._cid_count
        group, pending, sent = _Group(fut, len(texts)), self._pending, time.monotonic()
        outbox = self._outbox
        first, start = not outbox, len(outbox)
        append, count = outbox.append, first_count
        for at, text in enumerate(texts):
            count += 1
            cid = f"{base}{count}"
            data = encode(cid, text)
            if len(data) > limit:  # take back what this call queued: all or nothing
                for undo in range(first_count + 1, count):
                    del pending[f"{base}{undo}"]
                del outbox[start:]
                raise ClientError(p.ErrorCode.TOO_LARGE, f"line {at} is {len(data)} bytes encoded; the broker takes at most {limit}")
            pending[cid] = _Pending(data, group, sent, at)
            append(data)
        self._cid_count = count
        if first:  # the pump packs them (and whatever else this turn posts) into frames
            self._dealer.submit(self._flush)
        return fut

    def _submit(self, room: str, to: str, text: str, me: bool) -> asyncio.Future:
        self._cid_count += 1
        cid = f"{self._cid_base}{self._cid_count}"  # no random draw per line; decimal: half the cost of hex
        data = p.encode(p.Send(sid=self.sid, cid=cid, text=text, room=room, to=to, me=me))
        if len(data) > self.max_bytes:
            raise ClientError(p.ErrorCode.TOO_LARGE, f"message is {len(data)} bytes encoded; the broker takes at most {self.max_bytes}")
        fut = asyncio.get_running_loop().create_future()
        self._pending[cid] = _Pending(data, fut, time.monotonic())
        outbox = self._outbox
        if not outbox and self._dealer.send_now(data):
            return fut  # a lone line goes at once: a quiet chat pays no extra loop turn
        outbox.append(data)
        if len(outbox) == 1:  # the pump packs what else this turn posts into one frame
            self._dealer.submit(self._flush)
        return fut

    def _queue(self, data: bytes) -> None:
        outbox = self._outbox
        outbox.append(data)
        if len(outbox) == 1:  # the first of this turn: the pump packs them all when it runs
            self._dealer.submit(self._flush)

    def _flush(self, sock: zmq.Socket) -> None:
        """Send the outbox: a lone line as a Send, several as Sends frames within max_bytes."""
        outbox, self._outbox = self._outbox, []
        if len(outbox) == 1:
            sock.send(outbox[0], NOBLOCK)
            return
        room = self.max_bytes - 64  # the Sends envelope around the items
        most = p.MAX_SENDS_ITEMS
        group: list[bytes] = []
        size = 0
        for data in outbox:
            if group and (size + len(data) > room or len(group) == most):
                self._send_group(sock, group)
                group, size = [], 0
            group.append(data)
            size += len(data)
        self._send_group(sock, group)

    @staticmethod
    def _send_group(sock: zmq.Socket, group: list[bytes]) -> None:
        """A lone line goes as its own Send: wrapped in Sends, a line near the limit
        would be over it (65,555 > 65,536 bytes) and refused."""
        sock.send(p.encode_sends(group) if len(group) > 1 else group[0], NOBLOCK)

    async def _wait(self, fut: asyncio.Future, timeout: float | None) -> p.Stored:
        """Await a posted send. On timeout or cancellation it is no longer resent, but it
        is unconfirmed rather than cancelled: a copy already queued may still be stored."""
        try:
            if timeout is None:
                return await fut
            return await asyncio.wait_for(fut, timeout)
        except BaseException:
            self._forget_done()
            raise

    def _forget_done(self) -> None:
        """Stop resending posts whose future is settled (given up or cancelled)."""
        for cid in [cid for cid, pending in self._pending.items() if pending.future.done()]:
            del self._pending[cid]

    def _acked(self, cid: str, stored: p.Stored) -> None:
        pending = self._pending.pop(cid, None)
        if pending is not None:
            fut = pending.future
            if pending.at >= 0:
                fut.settle(pending.at, stored)  # type: ignore[union-attr]
            elif not fut.done():
                fut.set_result(stored)  # type: ignore[union-attr]

    def _send_failed(self, err: p.Error) -> None:
        if err.code in _RESEND:
            return  # stays pending: resent after ack_timeout
        pending = self._pending.pop(err.cid, None)
        if pending is not None:
            exc = ClientError(err.code, err.message, err.retry_after)
            if pending.at >= 0:
                pending.future.settle(pending.at, exc)  # type: ignore[union-attr]
            elif not pending.future.done():
                pending.future.set_exception(exc)

    async def _resends(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ack_timeout / 2))
            if self.state != "connected":
                continue
            # One pass over every pending line (thousands in flight for a bulk sender):
            # forget the given-up ones, resend the overdue ones.
            now, timeout, settled = time.monotonic(), self.ack_timeout, []
            for cid, pending in self._pending.items():
                if pending.future.done():
                    settled.append(cid)
                elif now - pending.sent >= timeout:
                    pending.sent = now
                    self._queue(pending.data)
            for cid in settled:
                del self._pending[cid]
