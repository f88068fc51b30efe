"""A client in its own process for the fault test at load; one JSON object per line.

usage: fault_peer.py BROKER NAME ROOM read            -> {"ready"}, then {"msg": [seq, sender, text]} / {"gap": ...}
       fault_peer.py BROKER NAME ROOM send COUNT       -> {"ready"}, then {"ok": [text, seq]} or {"fail": [text, why]}
A reader runs until SIGTERM; a sender keeps up to 8 lines in flight until COUNT are settled.

       fault_peer.py BROKER PREFIX ROOM group SENDERS READERS COUNT RATE
           -> several clients in one process (50 processes would cost the CPU the test is about):
              READERS readers and SENDERS senders, each sending COUNT lines at about RATE a second,
              one line in flight at a time (send returns, the next follows), from SIGUSR1 on
              (once every reader of every group has joined: a reader sees lines from its join). Lines carry the client's
              name first: {"ready": name}, {"msg": [reader, seq, sender, text]}, {"gap": [reader, ...]},
              {"state": [name, state]}, {"ok": [text, seq]}, {"fail": [text, why]}, {"done": name}.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from zchat import protocol as p
from zchat.client import Client, ClientError, Gap, StateChange


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


async def group(broker: str, prefix: str, room: str, senders: int, readers: int, count: int, rate: float) -> None:
    stop, go = asyncio.Event(), asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, go.set)

    def listener(name: str, reading: bool):  # type: ignore[no-untyped-def]
        def handle(events: list) -> None:
            for event in events:
                if reading and isinstance(event, p.Msg) and event.room == room and event.kind == "text":
                    out({"msg": [name, event.seq, event.sender, event.text]})
                elif isinstance(event, Gap):
                    out({"gap": [name, event.room, event.first, event.last, event.reason]})
                elif isinstance(event, StateChange):
                    out({"state": [name, event.state]})
        return handle

    clients = []
    for i in range(readers + senders):
        name = f"{prefix}-{'r' if i < readers else 's'}{i}"
        client = Client(broker, name, f"secret-of-{name}-0123456789", ack_timeout=1.0)
        await client.connect(timeout=30)
        await client.join(room)
        client.listen(listener(name, i < readers))
        clients.append(client)
        out({"ready": name})

    async def sending(client: Client) -> None:
        await go.wait()
        for i in range(count):
            text = f"{client.name}-{i}"
            try:
                stored = await client.send(room, text, timeout=60)
                out({"ok": [text, stored.seq]})
            except (ClientError, asyncio.TimeoutError) as exc:
                out({"fail": [text, repr(exc)]})
            await asyncio.sleep(1 / rate)  # the pace of a person typing fast, not a wait for an event
        out({"done": client.name})

    tasks = [asyncio.ensure_future(sending(c)) for c in clients[readers:]]
    await stop.wait()
    for task in tasks:
        task.cancel()
    for client in clients:
        await client.close()


if __name__ == "__main__":
    broker, name, room, mode = sys.argv[1:5]
    if mode == "group":
        senders, readers, count, rate = sys.argv[5:9]
        asyncio.run(group(broker, name, room, int(senders), int(readers), int(count), float(rate)))
        sys.exit(0)
    asyncio.run(main(broker, name, room, mode, int(sys.argv[5]) if len(sys.argv) > 5 else 0))


# ------------------------------------------------------------ the tests' side of "group"


class Groups:
    """The tests' view of ``group`` processes: starts them, reads their JSON lines."""

    def __init__(self, endpoint: str, env: dict[str, str], tmp: "Path", room: str = "load") -> None:
        self.endpoint, self.env, self.tmp, self.room = endpoint, env, tmp, room
        self.procs: list["subprocess.Popen"] = []
        self.logs: list["Path"] = []
        self.readers = self.senders = 0

    def start(self, count: int, senders: int, readers: int, lines: int, rate: float) -> None:
        import os
        import subprocess
        from pathlib import Path

        env = dict(self.env, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), self.env.get("PYTHONPATH", "")]))
        for g in range(count):
            log = self.tmp / f"group{g}.log"
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, __file__, self.endpoint, f"g{g}", self.room, "group", str(senders), str(readers), str(lines), str(rate)],
                env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
            ))
        self.readers += count * readers
        self.senders += count * senders

    def go(self) -> None:
        """Start the senders (every reader has joined)."""
        import signal as sig

        for proc in self.procs:
            proc.send_signal(sig.SIGUSR1)

    def rows(self, key: str) -> list:
        found = []
        for log in self.logs:
            for line in log.read_text().splitlines():
                if line.startswith("{") and line.endswith("}"):  # (the last line may be half written)
                    row = json.loads(line)
                    if key in row:
                        found.append(row[key])
        return found

    def alive(self) -> list[int]:
        """Exit codes of peers that have ended (a peer must not end before it is told to)."""
        return [proc.returncode for proc in self.procs if proc.poll() is not None]

    def views(self) -> dict[str, list[list]]:
        """reader -> the [seq, sender, text] it was handed, in order."""
        out: dict[str, list[list]] = {}
        for reader, *msg in self.rows("msg"):
            out.setdefault(reader, []).append(msg)
        return out

    def stop(self) -> None:
        import signal as sig
        import subprocess

        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def check_views(groups: Groups, ok: set[str]) -> None:
    """Every reader holds every acked line exactly once, in seq order, and no gap."""
    gaps = groups.rows("gap")
    assert not gaps, f"readers reported gaps while connected: {gaps[:5]}"
    views = groups.views()
    assert len(views) == groups.readers, f"only {len(views)} of {groups.readers} readers received anything"
    for reader, msgs in views.items():
        seqs = [m[0] for m in msgs]
        assert seqs == sorted(set(seqs)), f"{reader}: seqs out of order or doubled"
        texts = [m[2] for m in msgs]
        assert len(texts) == len(set(texts)), f"{reader}: a line delivered twice"
        missing = ok - set(texts)
        assert not missing, f"{reader}: {len(missing)} acked lines missing, e.g. {sorted(missing)[:5]}"
