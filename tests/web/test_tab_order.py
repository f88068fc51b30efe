"""A tab's frames leave in the order they were pushed, whichever way each goes out
(the pass's burst, or the writer's queue). Plain objects stand in for the socket: the
order is decided by Tab alone (tests/web/test_shared_frames.py has the real one)."""

from __future__ import annotations

import asyncio

from zchat.web.tab import BURST_BYTES, Tab
from zchat.web.wire import framed


class Transport:
    """Records what the burst writes; reports a buffer that is empty until told."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffered = 0

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return False


class Ws:
    """Records what the writer task sends (after the burst's writes, in one list)."""

    closed = False

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    async def send_frame(self, data: bytes, opcode: object) -> None:
        await asyncio.sleep(0)  # aiohttp may wait for the socket here
        self.transport.written.append(framed(data))

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        self.closed = True


def frames_in(written: list[bytes]) -> list[bytes]:
    """The frames' bodies, in the order they reached the socket."""
    out, data = [], b"".join(written)
    i = 0
    while i < len(data):
        n = data[i + 1] & 0x7F
        start = i + 2
        if n == 126:
            n, start = int.from_bytes(data[i + 2:i + 4], "big"), i + 4
        elif n == 127:
            n, start = int.from_bytes(data[i + 2:i + 10], "big"), i + 10
        out.append(data[start:start + n])
        i = start + n
    return out


async def test_a_frame_that_fits_the_burst_does_not_overtake_one_queued_before_it() -> None:
    """fails on the old code: a small frame joined the pass's burst while a bigger one,
    pushed before it, waited in the queue; the burst went first (seen in
    test_a_backed_up_tab_gets_every_line_once_in_order: seqs 2, 3, 64, 65 ... 4)."""
    transport = Transport()
    tab = Tab(Ws(transport), "key", transport=transport)  # type: ignore[arg-type]
    try:
        first = b"a" * 100  # into the burst (the tab is idle)
        big = b"b" * (BURST_BYTES - 50)  # does not fit beside it: to the queue
        small = b"c" * 10  # fits the burst's room, but the big frame is older
        for data in (first, big, small):
            assert tab.send(data)
        deadline = asyncio.get_running_loop().time() + 5
        while len(frames_in(transport.written)) < 3:
            assert asyncio.get_running_loop().time() < deadline, frames_in(transport.written)
            await asyncio.sleep(0.001)  # polling the stand-in socket
        assert frames_in(transport.written) == [first, big, small]
    finally:
        await tab.finish()
