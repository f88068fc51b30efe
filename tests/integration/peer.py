"""A client in its own process, for tests that stop or kill it (SIGSTOP, SIGKILL).

usage: peer.py BROKER NAME ROOM collect N   -> prints "ready", then one JSON summary line
       peer.py BROKER NAME ROOM idle        -> prints "ready", then waits to be killed

BROKER is a keyed address (tcp://HOST:PORT#k=KEY) for a CURVE broker; a test-only
plaintext broker's endpoint reaches it through ZCHAT_INSECURE_PLAINTEXT_ENDPOINTS.
"""

from __future__ import annotations

import asyncio
import json
import sys

from zchat import protocol as p
from zchat.client import Client


async def main(broker: str, name: str, room: str, mode: str, count: int) -> None:
    client = Client(broker, name, f"secret-of-{name}-0123456789", sub_hwm=20, recover_limit=1_000_000)
    await client.connect()
    await client.join(room)
    print("ready", flush=True)
    if mode == "idle":
        await asyncio.Event().wait()
    seqs = []
    async for event in client.events():
        if isinstance(event, p.Msg) and event.room == room and event.kind == "text":
            seqs.append(event.seq)
            if len(seqs) >= count:
                break
    print(json.dumps({"seqs": seqs, "recovered": client.recovered}), flush=True)
    await client.close()


if __name__ == "__main__":
    broker, name, room, mode = sys.argv[1:5]
    asyncio.run(main(broker, name, room, mode, int(sys.argv[5]) if len(sys.argv) > 5 else 0))
