"""A caller that stops reading its events costs its client a bounded amount of memory:
past ``unread_limit`` bytes of queued events the client stops reading the fan-out, and
once the caller reads again, what was dropped meanwhile comes from history, in order,
once each. (Before, the queue of unread events grew with every line of the room.)"""

from __future__ import annotations

import asyncio

from tests.conftest import RunningBroker
from zchat import protocol as p
from zchat.client import Client
from zchat.core import Limits

TEXT = "u" * 1000


def queued(client: Client) -> tuple[int, int]:
    """(events, bytes by weigh) sitting in the client's queue right now."""
    chunks = [c for c in list(client._events._queue) if c]  # noqa: SLF001 - what is held unread
    events = [e for c in chunks for e in c]
    return len(events), sum(200 + len(getattr(e, "text", "") or "") for e in events)


async def test_an_unread_queue_stops_at_its_bound_and_nothing_is_lost(tmp_path) -> None:
    """fails on main: 3,000 lines (about 3.6 MB of events) sit in the queue of a caller that
    does not read, against a bound of 64 KB."""
    limit = 64 * 1024
    running = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=2, rate=0, pub_hwm=4)).start()
    sender = Client(running.endpoint, "flood", "secret-of-flood-0123456789")
    reader = Client(running.endpoint, "lazy", "secret-of-lazy-0123456789", sub_hwm=20)
    reader.unread_limit = limit  # (a constructor argument too)
    try:
        await sender.connect()
        await reader.connect()
        await sender.join("firehose")
        await reader.join("firehose")
        total, most = 3000, 0
        for first in range(0, total, 100):
            await asyncio.gather(*(sender.post("firehose", f"{i} {TEXT}") for i in range(first, min(first + 100, total))))
            most = max(most, queued(reader)[1])
        # Let the reader's client take in whatever it will (polled: it reads in callbacks).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.0
        while loop.time() < deadline:
            most = max(most, queued(reader)[1])
            await asyncio.sleep(0.05)
        # The bound, plus one hand-over past it (a broker batch: up to 256 lines).
        assert most <= limit + 256 * (len(TEXT) + 300), f"{most:,} bytes of events queued unread (bound {limit:,})"
        held = reader.recovered  # (lines dropped before the bound was reached may have come already)
        seqs: list[int] = []
        gaps: list = []

        async def read_all() -> None:
            async for event in reader.events():
                if isinstance(event, p.Msg) and event.room == "firehose" and event.kind == "text":
                    seqs.append(event.seq)
                    if event.text.startswith(f"{total - 1} "):
                        return
                elif type(event).__name__ == "Gap":
                    gaps.append(event)

        await asyncio.wait_for(read_all(), 60)
        assert gaps == [], f"the reader was told of gaps: {gaps}"
        assert len(seqs) == total and seqs == list(range(seqs[0], seqs[0] + total)), "lost, repeated or out of order"
        assert reader.recovered > held, "nothing came from history after the hold-back: the fan-out was never held back"
    finally:
        await sender.close()
        await reader.close()
        await running.stop()
