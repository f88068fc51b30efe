"""``zchat bench --rooms``: what one membership change costs in a private room of N
members (default 1,000): the new wire topic and a Retopic notice on every online
member's inbox.

Two measures, printed as figures (never asserted):

- core: ``Core.request`` for a kick (then the invite and join that bring the member
  back), with every member online, and the encoding of the publications it made;
- broker: a real broker on 127.0.0.1 (plaintext, a temporary SQLite file) whose room
  has N members, ``--clients`` of them real clients and the rest sessions opened in its
  core (online, so they are told): the time from the kick's reply until every real
  client has received a line sent right after it (a new subscription, then the
  Heads-driven fetch of whatever was published meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from zchat import protocol as p
from zchat.core import Core, Limits, Outcome

ROOM = "big"


def _core_room(members: int) -> Core:
    names = [f"m{i:05d}" for i in range(members)]
    core = Core(epoch="E", boot="B", limits=Limits(rate=0, max_invites=10_000), users=names)
    for name in names:
        core.request(f"s-{name}", name, p.Hello(rid=1), 0.0, Outcome())
    core.request("s-m00000", "m00000", p.Join(rid=2, room=ROOM, private=True), 0.0, Outcome())
    for name in names[1:]:
        core.request("s-m00000", "m00000", p.Moderate(rid=3, room=ROOM, action="invite", name=name), 0.0, Outcome())
        core.request(f"s-{name}", name, p.Join(rid=4, room=ROOM), 0.0, Outcome())
    return core


def core_figures(members: int, repeats: int) -> dict[str, float]:
    """Seconds per kick in the core, and per encoding of what it publishes."""
    core = _core_room(members)
    kick_s: list[float] = []
    encode_s: list[float] = []
    notices = size = 0
    for i in range(repeats):
        victim = f"m{1 + i % (members - 1):05d}"
        out = Outcome()
        began = time.perf_counter()
        core.request("s-m00000", "m00000", p.Moderate(rid=5, room=ROOM, action="kick", name=victim), 1.0, out)
        kick_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        frames = [p.encode(body) for _, body in out.publish]
        encode_s.append(time.perf_counter() - began)
        notices = sum(1 for _, body in out.publish if isinstance(body, p.Retopic))
        size = sum(len(topic) + len(frame) for (topic, _), frame in zip(out.publish, frames))
        core.request("s-m00000", "m00000", p.Moderate(rid=6, room=ROOM, action="invite", name=victim), 1.0, Outcome())
        core.request(f"s-{victim}", victim, p.Join(rid=7, room=ROOM), 1.0, Outcome())
    return {
        "kick_core_ms_median": statistics.median(kick_s) * 1000, "encode_ms_median": statistics.median(encode_s) * 1000,
        "notices": notices, "published_bytes": size,
    }


async def broker_figures(members: int, clients: int, repeats: int) -> dict[str, float]:
    """Milliseconds from a kick's reply until every real client has the next line."""
    from zchat.broker import Broker
    from zchat.client import Client
    from zchat.guard import GuardConfig
    from zchat.storage.sqlite import SqliteStorage

    with tempfile.TemporaryDirectory() as tmp:
        limits = Limits(rate=0, heartbeat=60.0, max_invites=10_000)
        broker = Broker("tcp://127.0.0.1:0", SqliteStorage(Path(tmp) / "h.db"), limits,
                        guard=GuardConfig(max_per_address=100_000, claims_per_minute=0), insecure_plaintext=True)
        await broker.start()
        task = asyncio.create_task(broker.run())
        real: list[Client] = []
        try:
            op = Client(broker.endpoint, "op", "secret-of-op-0123456789")
            await op.connect()
            await op.join(ROOM, private=True)
            core = broker.core
            assert core is not None
            for i in range(clients):
                client = Client(broker.endpoint, f"c{i:04d}", f"secret-of-c{i:04d}-0123456789")
                await client.connect()
                await op.invite(ROOM, client.name)
                await client.join(ROOM)
                real.append(client)
            for i in range(members - clients - 1):  # the rest: online sessions of the core only
                name = f"s{i:05d}"
                core.add_user(name)
                core.request(f"x-{name}", name, p.Hello(rid=1), time.monotonic(), Outcome())
                out = Outcome()
                core.request(op.sid, "op", p.Moderate(rid=2, room=ROOM, action="invite", name=name), time.monotonic(), out)
                core.request(f"x-{name}", name, p.Join(rid=3, room=ROOM), time.monotonic(), out)
                await broker._apply(out)
            victim = Client(broker.endpoint, "victim", "secret-of-victim-0123456789")
            await victim.connect()
            waits: list[float] = []
            for n in range(repeats):
                await op.invite(ROOM, "victim")
                await victim.join(ROOM)
                began = time.perf_counter()
                await op.kick(ROOM, "victim")
                stored = await op.send(ROOM, f"after kick {n}")
                pending = {c.name for c in real}
                while pending:
                    for client in real:
                        if client.name in pending and client._trackers[ROOM].last >= stored.seq:
                            pending.discard(client.name)
                    await asyncio.sleep(0.001)
                waits.append(time.perf_counter() - began)
            await victim.close()
            await op.close()
            return {
                "members": len(core.members[ROOM]), "real_clients": clients,
                "kick_to_all_caught_up_ms_median": statistics.median(waits) * 1000,
                "kick_to_all_caught_up_ms_max": max(waits) * 1000,
            }
        finally:
            for client in real:
                await client.close()
            broker.stop()
            await task


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="zchat bench --rooms", description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20, help="real clients among the members (the rest are core sessions)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"core, {args.members} members online: {core_figures(args.members, args.repeats)}")
    print(f"broker, {args.members} members: {asyncio.run(broker_figures(args.members, args.clients, max(3, args.repeats // 2)))}")
    return 0
