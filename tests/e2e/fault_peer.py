"""A client in its own process for the fault test at load; one JSON object per line.

usage: fault_peer.py BROKER NAME ROOM read            -> {"ready"}, then {"msg": [seq, sender, text]} / {"gap": ...}
       fault_peer.py BROKER NAME ROOM send COUNT       -> {"ready"}, then {"ok": [text, seq]} or {"fail": [text, why]}
A reader runs until SIGTERM; a sender keeps up to 8 lines in flight until COUNT are settled.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from zchat import protocol as p
from zchat.client import Client, ClientError, Gap


def out(obj: object) -> None:
    print(json.dumps(obj), flush=True)


async def read(client: Client, room: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def pump() -> None:
        async for event in client.events():
            if isinstance(event, p.Msg) and event.room == room and event.kind == "text":
                out({"msg": [event.seq, event.sender, event.text]})
            elif isinstance(event, Gap):
                out({"gap": [event.room, event.first, event.last, event.reason]})

    task = asyncio.ensure_future(pump())
    await stop.wait()
    task.cancel()


async def send(client: Client, room: str, name: str, count: int) -> None:
    flight = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        text = f"{name}-{i}"
        try:
            stored = await client.send(room, text, timeout=30)
            out({"ok": [text, stored.seq]})
        except (ClientError, asyncio.TimeoutError) as exc:
            out({"fail": [text, repr(exc)]})
        finally:
            flight.release()

    tasks = []
    for i in range(count):
        await flight.acquire()
        tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.sleep(0.005)  # about 100 lines/s per sender with room to spare
    await asyncio.gather(*tasks)
    out({"done": count})


async def main(broker: str, name: str, room: str, mode: str, count: int) -> None:
    client = Client(broker, name, f"secret-of-{name}-0123456789", ack_timeout=1.0)
    await client.connect()
    await client.join(room)
    out({"ready": name})
    if mode == "read":
        await read(client, room)
    else:
        await send(client, room, name, count)
    await client.close()


if __name__ == "__main__":
    broker, name, room, mode = sys.argv[1:5]
    asyncio.run(main(broker, name, room, mode, int(sys.argv[5]) if len(sys.argv) > 5 else 0))
