"""CURVE brokers across restarts: invite codes and revocations are stored, and a revoked
key's every connection ends (its PUSH too).

Real brokers on 127.0.0.1 restarted on the same history file, real clients, raw
CURVE peers for the revoked device.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zmq

from tests.conftest import HEARTBEAT, RunningBroker
from tests.integration.raw import Raw
from zchat import protocol as p
from zchat.client import AuthError, Client, ClientError
from zchat.core import Limits

LIMITS = Limits(heartbeat=HEARTBEAT, rate=0)
LAPTOP = "laptop-secret-0123456789-abcd"
PHONE = "phone-secret-0123456789-abcdef"


async def start(tmp_path: Path, **security: object) -> RunningBroker:
    return await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path, **security).start()


async def restart(running: RunningBroker, tmp_path: Path, **security: object) -> RunningBroker:
    await running.stop()
    return await start(tmp_path, **security)


async def test_an_invite_code_survives_a_restart_and_works_once(tmp_path: Path) -> None:
    """fails on main: codes lived in the broker's memory, so the restarted broker refused alice's."""
    settings = dict(registration="invite", admins=("boss",))
    running = await start(tmp_path, **settings)
    boss = Client(running.broker.address, "boss", "secret-of-boss-0123456789")  # type: ignore[union-attr]
    await boss.connect()
    code = await boss.make_invite()
    await boss.close()
    running = await restart(running, tmp_path, **settings)
    address = running.broker.address  # type: ignore[union-attr]
    try:
        with pytest.raises(AuthError):
            await Client(address, "mallory", "secret-of-mallory-0123456789", invite="made-up-code").connect()
        alice = Client(address, "alice", "secret-of-alice-0123456789", invite=code)
        assert (await alice.connect()).name == "alice"
        await alice.close()
        with pytest.raises(AuthError):  # used
            await Client(address, "bob", "secret-of-bob-0123456789", invite=code).connect()
        assert "bob" not in running.core.users and "mallory" not in running.core.users
    finally:
        await running.stop()
    running = await start(tmp_path, **settings)
    try:  # used is used for good
        with pytest.raises(AuthError):
            await Client(running.broker.address, "carol", "secret-of-carol-0123456789", invite=code).connect()  # type: ignore[union-attr]
    finally:
        await running.stop()


async def test_two_claims_racing_for_one_invite_code_one_wins(tmp_path: Path) -> None:
    running = await start(tmp_path, registration="invite", admins=("boss",))
    address = running.broker.address  # type: ignore[union-attr]
    try:
        boss = Client(address, "boss", "secret-of-boss-0123456789")
        await boss.connect()
        code = await boss.make_invite()
        await boss.close()
        clients = [Client(address, f"racer{i}", f"secret-of-racer{i}-0123456789", invite=code) for i in range(4)]
        results = await asyncio.gather(*[c.connect() for c in clients], return_exceptions=True)
        won = [r for r in results if not isinstance(r, BaseException)]
        assert len(won) == 1, results
        assert all(isinstance(r, AuthError) for r in results if isinstance(r, BaseException))
        assert len([n for n in running.core.users if n.startswith("racer")]) == 1
        for c in clients:
            await c.close()
    finally:
        await running.stop()


async def test_a_revoked_key_is_refused_after_a_restart(tmp_path: Path) -> None:
    """fails on main: the broker stopped right after `ok` had not stored the key list yet,
    and kept revocations in memory only, so after a restart the revoked key came back
    (as alice, or look-only)."""
    running = await start(tmp_path)
    address = running.broker.address  # type: ignore[union-attr]
    laptop = Client(address, "alice", LAPTOP)
    await laptop.connect()
    phone = Client(address, "alice", PHONE)
    await laptop.add_key(phone.public_key.decode())
    assert (await phone.connect()).name == "alice"
    await laptop.revoke_key(phone.public_key.decode())
    await phone.close()
    await laptop.close()
    running = await restart(running, tmp_path)  # at once: the revocation was stored before `ok`
    broker = running.broker
    assert broker is not None
    try:
        raw = Raw(broker.endpoint, "alice", PHONE, server_key=broker.public_key)
        try:
            assert await raw.handshake() == zmq.EVENT_HANDSHAKE_FAILED_AUTH  # not even look-only
        finally:
            raw.close()
        back = Client(broker.address, "alice", LAPTOP)
        assert (await back.connect()).name == "alice"
        assert await back.list_keys() == [back.public_key.decode()]
        await back.close()
    finally:
        await running.stop()


async def test_revoking_the_last_key_of_a_name_is_refused(tmp_path: Path) -> None:
    running = await start(tmp_path)
    try:
        solo = Client(running.broker.address, "solo", "secret-of-solo-0123456789")  # type: ignore[union-attr]
        await solo.connect()
        with pytest.raises(ClientError) as refused:
            await solo.revoke_key(solo.public_key.decode())
        assert refused.value.code == p.ErrorCode.BAD_REQUEST and "last key" in str(refused.value)
        assert await solo.list_keys() == [solo.public_key.decode()]
        await solo.close()
    finally:
        await running.stop()


async def test_a_revoked_keys_push_is_cut_and_its_lines_not_stored(tmp_path: Path) -> None:
    """fails on main: the revocation cut the phone's DEALER and SUB only; lines on its
    PUSH still came in as alice's and were stored."""
    running = await start(tmp_path)
    broker = running.broker
    assert broker is not None
    laptop = Client(broker.address, "alice", LAPTOP)
    await laptop.connect()
    await laptop.join("lobby")
    await laptop.add_key(Client(broker.address, "alice", PHONE).public_key.decode())
    phone = Raw(broker.endpoint, "alice", PHONE, server_key=broker.public_key, routing_id=b"phone-session-0001")
    push = Raw(f"tcp://127.0.0.1:{broker.ports[1]}", "alice", PHONE, kind=zmq.PUSH, server_key=broker.public_key)
    try:
        assert await phone.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert isinstance(await phone.request(p.Hello(rid=1, client="raw phone")), p.Welcome)
        sid = phone.sock.routing_id.decode("latin-1")
        await push.sock.send(p.encode(p.Send(sid=sid, cid="phone-1", room="lobby", text="from the phone")))
        ack = p.decode_reply(await asyncio.wait_for(phone.sock.recv(), 5))
        assert isinstance(ack, p.Ack) and ack.stored[0].cid == "phone-1"
        await laptop.revoke_key(phone.public_key.decode())
        await phone.wait_event(zmq.EVENT_DISCONNECTED)
        # The PUSH stays open on the phone's side and keeps sending.
        for i in range(3):
            await push.sock.send(p.encode(p.Send(sid=sid, cid=f"phone-late-{i}", room="lobby", text=f"after revocation {i}")))
        await push.wait_event(zmq.EVENT_DISCONNECTED)
        marker = await laptop.send("lobby", "marker after the phone's lines")
        page = await laptop.history("lobby", limit=50)
        texts = [m.text for m in page]
        assert "from the phone" in texts and "marker after the phone's lines" in texts
        assert not [t for t in texts if t.startswith("after revocation")]
        assert marker.seq == page[-1].seq
        # ...and it does not come back: its reconnect is refused at the handshake.
        await push.wait_event(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    finally:
        phone.close()
        push.close()
        await laptop.close()
        await running.stop()


async def test_a_released_squatters_key_stays_refused_after_a_restart(tmp_path: Path) -> None:
    """fails without storing the release's revocation: after a restart the squatter's key
    came back look-only (it handshook with 200 and `*`)."""
    running = await start(tmp_path, admins=("root",))
    address = running.broker.address  # type: ignore[union-attr]
    root, squat = Client(address, "root", "secret-of-root-0123456789"), Client(address, "squat", "secret-of-squat-0123456789")
    await root.connect()
    await squat.connect()
    await root.release("squat")
    await squat.close()
    await root.close()
    running = await restart(running, tmp_path, admins=("root",))
    broker = running.broker
    assert broker is not None
    try:
        raw = Raw(broker.endpoint, "squat", "secret-of-squat-0123456789", server_key=broker.public_key)
        try:
            assert await raw.handshake() == zmq.EVENT_HANDSHAKE_FAILED_AUTH  # not even look-only
        finally:
            raw.close()
    finally:
        await running.stop()
