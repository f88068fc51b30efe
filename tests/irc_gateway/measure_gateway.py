"""What an IRC connection costs the gateway, and how fast a room's lines reach N IRC
clients through it (in-process broker without rate limits, in-process gateway, raw IRC
peers on real sockets). Prints figures; asserts nothing about time.

    PYTHONPATH=$PWD python tests/irc_gateway/measure_gateway.py [CLIENTS [LINES]]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import HEARTBEAT, RunningBroker
from tests.irc_gateway.conftest import open_peer, register
from zchat.client import Client
from zchat.core import Limits
from zchat.irc.server import Gateway
from zchat.irc.signin import Gatekeeper


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def measure(clients: int, lines: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ZCHAT_CONFIG_DIR"] = str(Path(tmp) / "config")
        broker = await RunningBroker(Path(tmp) / "h.db", Limits(heartbeat=HEARTBEAT * 20, rate=0, request_rate=0, room_rate=0)).start()
        gateway = Gateway(broker.endpoint, Gatekeeper(None), history=0, max_per_address=100_000)
        port = await gateway.start("127.0.0.1", 0)
        bob = Client(broker.endpoint, "bob", "secret-of-bob-0123456789")
        await bob.connect()
        await bob.join("general")
        before = rss_kib()
        start = time.perf_counter()
        peers = []
        for i in range(clients):
            peer = await open_peer(port)
            await register(peer, f"irc{i}")
            peer.send("JOIN #general")
            await peer.cmd("366", timeout=60)
            peers.append(peer)
        joined = time.perf_counter() - start
        after = rss_kib()
        start = time.perf_counter()
        for i in range(lines):
            bob.post("general", f"line {i} " + "x" * 60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(sum(1 for x in p.lines if x.command == "PRIVMSG") >= lines for p in peers):
                break
            await asyncio.sleep(0.01)
        took = time.perf_counter() - start
        got = sum(sum(1 for x in p.lines if x.command == "PRIVMSG") for p in peers)
        print(f"{clients} IRC clients signed in and joined in {joined:.2f} s ({joined / clients * 1000:.1f} ms each)")
        print(f"gateway process RSS +{(after - before) / 1024:.1f} MiB for {clients} connections "
              f"({(after - before) / clients:.0f} KiB each, broker in the same process)")
        print(f"{lines} lines x {clients} clients = {got} of {lines * clients} PRIVMSGs delivered in {took:.2f} s "
              f"({got / took:,.0f} lines/s out of the gateway)")
        for peer in peers:
            await peer.close()
        await bob.close()
        await gateway.stop()
        await broker.stop()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    m = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    asyncio.run(measure(n, m))
