"""A vanished client goes offline when its connection ends, not three heartbeats later;
a stopped one (its connection open and silent) when its pings stop, within 3 heartbeats.

The brokers of the kill tests ping rarely (heartbeat 60 s: presence would time out after
180 s), so an "offline" within seconds can only come from the socket monitor's
DISCONNECTED event (zchat.broker.liveness). The SIGSTOP test runs a 1 s heartbeat: the
kernel keeps answering for the stopped process, so only the presence expiry ends it.
Clients are real processes, killed with SIGKILL or stopped with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, RunningBroker, collect, wait_for
from zchat import protocol as p
from zchat.client import Client, ClientError
from zchat.core import Limits, Outcome

PEER = str(Path(__file__).with_name("peer.py"))
SLOW_HEARTBEAT = 60.0
BOUND = 8.0  # seconds: the grace for a reconnecting DEALER (3 s), the broker's tick (1 s), a loaded machine
FAST_HEARTBEAT = 1.0  # the SIGSTOP test's: presence times out after 3 s


@pytest.fixture
async def slow_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    running = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=SLOW_HEARTBEAT, rate=0)).start()
    yield running
    await running.stop()


async def _client(running: RunningBroker, name: str) -> Client:
    client = Client(running.endpoint, name, f"secret-of-{name}-0123456789")
    await client.connect()
    await client.join("general")
    return client


def _peer(running: RunningBroker, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, PEER, running.endpoint, name, "general", "idle"], stdout=subprocess.PIPE, text=True)


async def _online(watcher: Client) -> dict[str, bool]:
    return {m.name: m.online for m in await watcher.who("general")}


async def test_killed_client_goes_offline_within_the_bound(slow_broker: RunningBroker) -> None:
    """fails without the monitor path (the broker's _connections_gone): offline only after 180 s."""
    watcher = await _client(slow_broker, "watcher")
    proc = _peer(slow_broker, "ghost")
    try:
        assert await asyncio.to_thread(proc.stdout.readline) == "ready\n"
        assert (await _online(watcher))["ghost"] is True
        proc.kill()
        await asyncio.to_thread(proc.wait)
        gone = await collect(watcher, 1, timeout=BOUND, kinds=(p.Presence,), where=lambda e: e.name == "ghost")
        assert gone[0].online is False
        assert (await _online(watcher))["ghost"] is False
        assert slow_broker.core.counters.get("session_disconnected", 0) >= 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await watcher.close()


async def test_others_stay_online_when_one_connection_ends(slow_broker: RunningBroker) -> None:
    """Killing one client closes its session only: the others (and the descriptors that
    the next connections reuse) keep theirs, and a newcomer after the kill is online."""
    watcher = await _client(slow_broker, "watcher")
    stay = await _client(slow_broker, "stay")
    procs = [_peer(slow_broker, f"ghost{i}") for i in range(3)]
    try:
        for proc in procs:
            assert await asyncio.to_thread(proc.stdout.readline) == "ready\n"
        procs[1].kill()
        await asyncio.to_thread(procs[1].wait)
        await collect(watcher, 1, timeout=BOUND, kinds=(p.Presence,), where=lambda e: e.name == "ghost1" and not e.online)
        late = await _client(slow_broker, "late")  # likely on the descriptor ghost1 freed
        online = await _online(watcher)
        assert online["ghost1"] is False
        assert all(online[n] for n in ("watcher", "stay", "ghost0", "ghost2", "late")), online
        await stay.send("general", "still here")  # the marker: sessions still work after the kill
        await wait_for(lambda: slow_broker.core.counters.get("session_disconnected", 0) == 1, what="one disconnect")
        await late.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        await stay.close()
        await watcher.close()


async def test_client_comes_back_after_its_session_was_closed(slow_broker: RunningBroker) -> None:
    """A session closed under a live client (its connection seen ending) is not the end:
    the client's next request gets no_session and it says hello again, online again."""
    bob = await _client(slow_broker, "bob")
    try:
        assert slow_broker.core.disconnected(bob.sid, 0.0, Outcome())  # as if its connection had ended
        assert not slow_broker.core.online("bob")
        with contextlib.suppress(ClientError):
            await bob.ping(timeout=5)  # no_session -> hello again
        await wait_for(lambda: slow_broker.core.online("bob"), what="bob online again")
        stored = await bob.send("general", "back")
        assert stored.seq >= 1
    finally:
        await bob.close()


async def test_stopped_client_goes_offline_within_three_heartbeats(tmp_path: Path) -> None:
    """A SIGSTOPped client keeps its connection (the kernel answers keepalive) and says
    nothing: its user goes offline once 3 heartbeats pass without a ping, and comes back
    after SIGCONT (its next ping gets no_session and it says hello again).
    Fails with the tick's presence expiry removed (core.Sessions.tick): online for ever."""
    running = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=FAST_HEARTBEAT, rate=0)).start()
    watcher = await _client(running, "watcher")
    proc = _peer(running, "sleeper")
    try:
        assert await asyncio.to_thread(proc.stdout.readline) == "ready\n"
        assert (await _online(watcher))["sleeper"] is True
        os.kill(proc.pid, signal.SIGSTOP)
        bound = running.limits.presence_timeout + FAST_HEARTBEAT + BOUND  # its last ping, the tick, a loaded machine
        gone = await collect(watcher, 1, timeout=bound, kinds=(p.Presence,), where=lambda e: e.name == "sleeper")
        assert gone[0].online is False
        assert (await _online(watcher))["sleeper"] is False
        assert running.core.counters.get("session_expired", 0) >= 1
        assert running.core.counters.get("session_disconnected", 0) == 0  # its connection never ended
        os.kill(proc.pid, signal.SIGCONT)
        back = await collect(watcher, 1, timeout=bound, kinds=(p.Presence,), where=lambda e: e.name == "sleeper")
        assert back[0].online is True
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
        await watcher.close()
        await running.stop()


async def test_client_sees_a_killed_broker_at_once(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The client's DEALER monitor reports the broker's connection ending: the client says
    "reconnecting" within seconds (heartbeat 60 s), and "connected" again once a broker
    is back on the same address and history.
    Fails without the DISCONNECTED path (zchat.client.connection._watch): "connected"
    until a ping goes unanswered, a heartbeat and a ping's timeout later."""
    proc = BrokerProcess(tmp_path / "h.db", cli_env, "--heartbeat", str(SLOW_HEARTBEAT)).start()
    client = Client(proc.endpoint, "alice", "secret-of-alice-0123456789")
    try:
        await client.connect()
        await client.join("general")
        proc.stop(signal.SIGKILL)
        await wait_for(lambda: client.state == "reconnecting", timeout=BOUND, what="the client to see its broker gone")
        proc.start()  # same address, same key directory (cli_env), same history
        await wait_for(lambda: client.state == "connected", timeout=BOUND + 5, what="connected again")
        stored = await client.send("general", "back")
        assert stored.seq >= 1
    finally:
        await client.close()
        proc.stop()


async def test_a_lazy_pong_waits_for_a_reply_that_goes_anyway(tmp_path: Path) -> None:
    """A heartbeat's (lazy) pong is held by the broker and goes out with the next reply
    it sends (here an eager ping's: the tick is 30 s away).
    Fails on main: nothing is held, the pong goes at once."""
    running = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=SLOW_HEARTBEAT, rate=0), tick=30.0).start()
    alice = await _client(running, "alice")
    try:
        lazy = asyncio.ensure_future(alice._request(lambda rid: p.Ping(rid=rid, lazy=True), timeout=20))
        await wait_for(lambda: len(running.broker.held) == 1, what="the lazy pong held")
        assert not lazy.done()
        await alice.ping()
        assert isinstance(await asyncio.wait_for(lazy, 10), p.Pong)
        assert running.broker.held == []
    finally:
        await alice.close()
        await running.stop()


async def test_a_lazy_pong_goes_at_the_tick(tmp_path: Path) -> None:
    """With nothing else to send, a held pong goes at the broker's next tick (1 s).
    Fails without the tick's release (Liveness._release_pongs): it never comes."""
    running = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=SLOW_HEARTBEAT, rate=0)).start()
    alice = await _client(running, "alice")
    try:
        pong = await alice._request(lambda rid: p.Ping(rid=rid, lazy=True), timeout=BOUND)
        assert isinstance(pong, p.Pong) and "general" in pong.heads
    finally:
        await alice.close()
        await running.stop()
