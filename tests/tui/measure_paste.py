"""How long a confirmed paste of N lines blocks the screen, and how long until the
broker stored them all (in-process broker, no rate limit). Prints figures; asserts
nothing about time.

    PYTHONPATH=$PWD python tests/tui/measure_paste.py [N ...]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from textual import events

from tests.conftest import HEARTBEAT, RunningBroker
from zchat.client import Client
from zchat.core import Limits
from zchat.tui import app as tui


async def measure(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = await RunningBroker(Path(tmp) / "h.db", Limits(heartbeat=HEARTBEAT, rate=0)).start()
        bob = Client(broker.endpoint, "bob", "secret-of-bob-0123456789")
        await bob.connect()
        app = tui.ChatApp(broker.endpoint, "alice", ["general"], secret="secret-of-alice-0123456789")
        blocked: list[float] = []
        take = app._take_lines

        def timed(lines: list[str]) -> None:
            start = time.perf_counter()
            take(lines)
            blocked.append(time.perf_counter() - start)

        app._take_lines = timed  # type: ignore[method-assign]
        try:
            async with app.run_test(size=(120, 36)) as pilot:
                while not (app.state == "connected" and app.buffers["general"].loaded):
                    await pilot.pause()
                    await asyncio.sleep(0.01)
                start = time.perf_counter()
                app.input.post_message(events.Paste("\n".join(f"pasted line {i}" for i in range(n))))
                while not blocked:
                    await pilot.pause()
                    if isinstance(app.screen, tui.PasteConfirm):
                        await pilot.press("y")
                    await asyncio.sleep(0.005)
                while app.sendq.qsize() or app.sending:
                    await asyncio.sleep(0.01)
                sent = time.perf_counter() - start
                while len(app.buffers["general"].seqs) < n + 1:  # + alice's join line
                    await pilot.pause()
                    await asyncio.sleep(0.01)
                shown = time.perf_counter() - start
            stored = [m for m in await bob.history("general", limit=min(n + 10, 1000)) if m.kind == "text"]
            print(f"{n:5d} lines: screen blocked {blocked[0] * 1000:7.1f} ms taking them, all acked after {sent:6.2f} s, "
                  f"all in the log after {shown:6.2f} s ({n / sent:6.0f} lines/s); stored {len(stored)} (last {stored[-1].text!r})")
        finally:
            await bob.close()
            await broker.stop()


async def main() -> None:
    for n in [int(a) for a in sys.argv[1:]] or [6, 100, 1000]:
        await measure(n)


if __name__ == "__main__":
    asyncio.run(main())
