"""CURVE brokers: encryption on the wire, key pinning, names owned by keys, registration.

Real brokers on 127.0.0.1, real clients, and a recording TCP relay between them.
Every test gets its own CONFIG_DIR (known_brokers, pins) through ZCHAT_CONFIG_DIR.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest
import zmq.asyncio
from zmq.utils import z85

from tests.conftest import HEARTBEAT, RunningBroker, TEST_EDGE, chat, free_port_base, wait_for
from zchat import auth, keys
from zchat import protocol as p
from zchat.client import AuthError, BrokerKeyError, Client
from zchat.core import Limits
from zchat.sockio import close_monitored

LIMITS = Limits(heartbeat=HEARTBEAT, rate=0)


@pytest.fixture(autouse=True)
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config"
    monkeypatch.setenv("ZCHAT_CONFIG_DIR", str(path))
    return path


class Relay:
    """Forwards TCP from a local port to ``target`` and records every byte both ways."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.data = bytearray()
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self, port: int) -> "Relay":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = port
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while chunk := await src.read(65536):
                    self.data += chunk
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def relays_for(running: RunningBroker) -> list[Relay]:
    """Relays in front of the broker's four ports; its welcome sends clients to them."""
    broker = running.broker
    assert broker is not None and broker.core is not None
    base = free_port_base(4)
    targets = [*broker.ports, broker.ports[0] + keys.KEYS_PORT_OFFSET]
    relays = [await Relay(t).start(base + i) for i, t in enumerate(targets)]
    broker.core.limits = dataclasses.replace(broker.core.limits, pull_port=base + 1, pub_port=base + 2)
    return relays


@pytest.mark.parametrize("secure", [True, False], ids=["curve", "plaintext"])
async def test_the_wire_shows_no_text_names_dms_or_keys(tmp_path: Path, secure: bool) -> None:
    running = await RunningBroker(tmp_path / "h.db", LIMITS, secure=secure, key_dir=tmp_path).start()
    relays = await relays_for(running)
    endpoint = f"tcp://127.0.0.1:{relays[0].port}"
    address = keys.keyed_address(endpoint, running.broker.public_key) if secure else endpoint  # type: ignore[union-attr]
    if not secure:
        keys.declare_insecure(endpoint)  # the relay stands for the plaintext broker
    secrets = {"qzalice": "alice-secret-0123456789-wxyz", "qzbob": "bob-secret-0123456789-wxyz"}
    alice = Client(address, "qzalice", secrets["qzalice"])
    bob = Client(address, "qzbob", secrets["qzbob"])
    try:
        await alice.connect()
        await bob.connect()
        await alice.join("qzroom")
        await bob.join("qzroom")
        await alice.send("qzroom", "ROOM-TEXT-7f3e")
        await alice.send_dm("qzbob", "DM-TEXT-91ab")
        got = await chat(bob, 2)
        assert {m.text for m in got} == {"ROOM-TEXT-7f3e", "DM-TEXT-91ab"}
    finally:
        await alice.close()
        await bob.close()
        await running.stop()
        for relay in relays:
            await relay.stop()
        keys.undeclare_insecure(endpoint)
    wire = bytes(b"".join(bytes(r.data) for r in relays[:3]))
    assert len(wire) > 1000  # the relay saw the whole session
    needles = [b"ROOM-TEXT-7f3e", b"DM-TEXT-91ab", b"qzalice", b"qzbob", b"qzroom"]
    needles += [s.encode() for s in secrets.values()]
    for client in (alice, bob):
        needles += [client.public_key, client._secret_key, z85.decode(client.public_key), z85.decode(client._secret_key)]
    found = [n for n in needles if n in wire]
    if secure:
        assert found == []
        server = running.broker.public_key  # type: ignore[union-attr]
        assert server not in wire and z85.decode(server) not in wire
    else:  # the same relay reads a plaintext session: the test can fail
        assert b"ROOM-TEXT-7f3e" in found and b"DM-TEXT-91ab" in found and b"qzalice" in found
        assert secrets["qzalice"].encode() in found


async def test_first_use_pins_and_another_key_is_refused_before_anything_is_sent(tmp_path: Path, config_dir: Path) -> None:
    first = await RunningBroker(tmp_path / "a.db", LIMITS, secure=True, key_dir=tmp_path / "a").start()
    relays = await relays_for(first)
    address = f"tcp://127.0.0.1:{relays[0].port}"  # no key: trust on first use (loopback)
    alice = Client(address, "alice", "secret-of-alice-0123456789")
    await alice.connect()
    await alice.close()
    assert keys.pinned(address) == first.broker.public_key.decode()  # type: ignore[union-attr]
    assert address in (config_dir / "known_brokers").read_text()
    await first.stop()

    second = await RunningBroker(tmp_path / "b.db", LIMITS, secure=True, key_dir=tmp_path / "b").start()
    assert second.broker.public_key != first.broker.public_key  # type: ignore[union-attr]
    for relay, target in zip(relays, [*second.broker.ports, second.broker.ports[0] + keys.KEYS_PORT_OFFSET]):  # type: ignore[union-attr]
        relay.target = target
    before = relays[0].connections
    with pytest.raises(BrokerKeyError) as refused:
        await Client(address, "alice", "secret-of-alice-0123456789").connect()
    message = str(refused.value)
    assert "pinned" in message and keys.fingerprint(second.broker.public_key) in message  # type: ignore[union-attr]
    assert "known_brokers" in message and "#k=" in message  # what happened, and how to fix it
    # Nothing reached the broker's request port: a raw connection made after the refusal
    # is the first one the relay sees.
    _, writer = await asyncio.open_connection("127.0.0.1", relays[0].port)
    await wait_for(lambda: relays[0].connections > before, what="the marker connection")
    assert relays[0].connections == before + 1
    writer.close()
    # The fix the message gives: the new key in the address.
    fixed = Client(keys.keyed_address(address, second.broker.public_key), "alice", "secret-of-alice-0123456789")  # type: ignore[union-attr]
    await fixed.connect()
    await fixed.close()
    assert keys.pinned(address) == second.broker.public_key.decode()  # type: ignore[union-attr]
    await second.stop()
    for relay in relays:
        await relay.stop()


async def test_an_unknown_broker_off_loopback_needs_the_key_or_trust(tmp_path: Path) -> None:
    assert keys.is_loopback("tcp://127.0.0.1:5555") and keys.is_loopback("tcp://localhost:5555")
    assert not keys.is_loopback("tcp://192.0.2.7:5555") and not keys.is_loopback("tcp://chat.example.org:5555")
    with pytest.raises(ValueError):
        keys.split_address("tcp://127.0.0.1:5555#k=short")


async def test_a_wrong_key_for_a_taken_name_is_refused(tmp_path: Path) -> None:
    running = await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path).start()
    address = running.broker.address  # type: ignore[union-attr]
    owner = Client(address, "alice", "secret-of-alice-0123456789")
    await owner.connect()
    with pytest.raises(AuthError):
        await Client(address, "alice", "another-secret-0123456789xyz").connect()
    await owner.join("lobby")  # the owner is untouched
    await owner.close()
    again = Client(address, "alice", "secret-of-alice-0123456789")
    assert (await again.connect()).name == "alice"
    await again.close()
    look = Client.looker(address)
    assert (await look.connect()).name == p.LOOKER  # look-only: a throwaway key
    await look.close()
    await running.stop()


async def test_the_broker_key_is_made_once_and_reused(tmp_path: Path) -> None:
    public, secret = keys.broker_keypair(tmp_path)
    assert (tmp_path / keys.KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert keys.broker_keypair(tmp_path) == (public, secret)
    running = await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path).start()
    assert running.broker.public_key == public  # type: ignore[union-attr]
    assert running.broker.address == f"{running.broker.endpoint}#k={public.decode()}"  # type: ignore[union-attr]
    await running.stop()


async def test_registration_closed_takes_admins_only(tmp_path: Path) -> None:
    running = await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path, registration="closed", admins=("boss",)).start()
    address = running.broker.address  # type: ignore[union-attr]
    with pytest.raises(AuthError):
        await Client(address, "alice", "secret-of-alice-0123456789").connect()
    boss = Client(address, "boss", "secret-of-boss-0123456789")
    assert (await boss.connect()).name == "boss"
    await boss.close()
    assert "alice" not in running.core.users
    await running.stop()


async def test_registration_by_invite_takes_a_code_once(tmp_path: Path) -> None:
    running = await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path, registration="invite").start()
    address = running.broker.address  # type: ignore[union-attr]
    with pytest.raises(AuthError):
        await Client(address, "alice", "secret-of-alice-0123456789").connect()
    with pytest.raises(AuthError):
        await Client(address, "alice", "secret-of-alice-0123456789", invite="made-up-code").connect()
    code = auth.new_invite_code()  # as `zchat admin invite` makes one (stored, so it outlives a restart)
    assert await running.broker.storage.add_invite(code, time.time() + 60, time.time(), auth.MAX_INVITES)  # type: ignore[union-attr]
    alice = Client(address, "alice", "secret-of-alice-0123456789", invite=code)
    assert (await alice.connect()).name == "alice"
    with pytest.raises(AuthError):  # used
        await Client(address, "bob", "secret-of-bob-0123456789", invite=code).connect()
    await alice.close()
    again = Client(address, "alice", "secret-of-alice-0123456789")  # an owned name needs no code
    assert (await again.connect()).name == "alice"
    await again.close()
    await running.stop()


async def test_registration_open_takes_new_names_within_the_claim_limit(tmp_path: Path) -> None:
    edge = dataclasses.replace(TEST_EDGE, claims_per_minute=1)
    running = await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path, guard=edge).start()
    address = running.broker.address  # type: ignore[union-attr]
    alice = Client(address, "alice", "secret-of-alice-0123456789")
    assert (await alice.connect()).name == "alice"
    with pytest.raises(AuthError):  # a second new name from this address within the minute
        await Client(address, "bob", "secret-of-bob-0123456789").connect()
    await alice.close()
    await running.stop()


async def test_a_plain_era_name_moves_to_its_key_once_with_its_secret(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    old = await RunningBroker(db, LIMITS).start()  # a PLAIN broker (test-only mode) of before
    alice = Client(old.endpoint, "alice", "secret-of-alice-0123456789")
    await alice.connect()
    await alice.join("lobby")
    await alice.send("lobby", "from the plain era")
    await alice.close()
    await old.stop()

    new = await RunningBroker(db, LIMITS, secure=True, key_dir=tmp_path).start()
    address = new.broker.address  # type: ignore[union-attr]
    with pytest.raises(AuthError):  # someone without the secret cannot take it over
        await Client(address, "alice", "not-alices-secret-0123456789").connect()
    moved = Client(address, "alice", "secret-of-alice-0123456789")
    assert (await moved.connect()).name == "alice"
    page = await moved.history("lobby", limit=10)
    assert "from the plain era" in [m.text for m in page]  # the history DB still works
    await moved.close()
    stored = await new.broker.storage.get_user("alice")  # type: ignore[union-attr]
    assert stored is not None and stored.startswith(b"curve:")
    await new.stop()
    again = await RunningBroker(db, LIMITS, secure=True, key_dir=tmp_path).start()  # bound to the key for good
    back = Client(again.broker.address, "alice", "secret-of-alice-0123456789")  # type: ignore[union-attr]
    assert (await back.connect()).name == "alice"
    await back.close()
    await again.stop()


async def test_a_second_device_authorised_from_the_first_then_revoked(tmp_path: Path) -> None:
    running = await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path).start()
    address = running.broker.address  # type: ignore[union-attr]
    laptop = Client(address, "alice", "laptop-secret-0123456789-abcd")
    await laptop.connect()
    phone = Client(address, "alice", "phone-secret-0123456789-abcdef")
    with pytest.raises(AuthError):  # not authorised yet: the name is taken
        await Client(address, "alice", "phone-secret-0123456789-abcdef").connect()
    await laptop.add_key(phone.public_key.decode())
    assert sorted(await laptop.list_keys()) == sorted([laptop.public_key.decode(), phone.public_key.decode()])
    assert (await phone.connect()).name == "alice"
    bob = Client(address, "bob", "secret-of-bob-0123456789")
    await bob.connect()
    for c in (laptop, phone, bob):
        await c.join("lobby")
    await bob.send("lobby", "to both devices")
    for device in (laptop, phone):
        assert [m.text for m in await chat(device, 1)] == ["to both devices"]
    members = await bob.who("lobby")
    assert [m.name for m in members].count("alice") == 1  # one user, two devices

    await laptop.revoke_key(phone.public_key.decode())
    await wait_for(lambda: phone.state == "closed", what="the revoked device's session to end")
    with pytest.raises(AuthError):
        await Client(address, "alice", "phone-secret-0123456789-abcdef").connect()
    await bob.send("lobby", "after the revocation")
    assert [m.text for m in await chat(laptop, 1)] == ["after the revocation"]  # the laptop is untouched
    await wait_for(lambda: not running.broker.key_writes, what="the keys to be stored")  # type: ignore[union-attr]
    await laptop.close()
    await bob.close()
    await running.stop()
    again = await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path).start()  # stored, not only in memory
    with pytest.raises(AuthError):
        await Client(again.broker.address, "alice", "phone-secret-0123456789-abcdef").connect()  # type: ignore[union-attr]
    back = Client(again.broker.address, "alice", "laptop-secret-0123456789-abcd")  # type: ignore[union-attr]
    assert (await back.connect()).name == "alice"
    await back.close()
    await again.stop()


async def test_invite_codes_come_from_admins_only(tmp_path: Path) -> None:
    running = await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path, registration="invite", admins=("boss",)).start()
    address = running.broker.address  # type: ignore[union-attr]
    boss = Client(address, "boss", "secret-of-boss-0123456789")
    await boss.connect()
    code = await boss.make_invite()
    carol = Client(address, "carol", "secret-of-carol-0123456789", invite=code)
    assert (await carol.connect()).name == "carol"
    with pytest.raises(Exception) as refused:
        await carol.make_invite()
    assert getattr(refused.value, "code", "") == p.ErrorCode.FORBIDDEN
    await carol.close()
    await boss.close()
    await running.stop()


async def test_one_secret_for_several_names_makes_a_key_per_name(tmp_path: Path) -> None:
    running = await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path).start()
    address = running.broker.address  # type: ignore[union-attr]
    clients = [Client(address, f"user{i}", "one-shared-secret-0123456789") for i in range(3)]
    try:
        for c in clients:
            assert (await c.connect()).name == c.name
        assert len({c.public_key for c in clients}) == 3
    finally:
        for c in clients:
            await c.close()
        await running.stop()


async def test_a_key_claim_that_never_says_hello_is_released(tmp_path: Path) -> None:
    import zmq
    import zmq.asyncio

    edge = dataclasses.replace(TEST_EDGE, claim_timeout=0.3)
    running = await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path, guard=edge).start()
    broker = running.broker
    assert broker is not None
    squatter_secret = "squatter-secret-0123456789"
    public, secret = keys.keypair_from_secret(squatter_secret, "dave")
    ctx = zmq.asyncio.Context.instance()

    def dealer() -> zmq.asyncio.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = broker.public_key, public, secret
        return sock

    first = dealer()  # a look-only connection asks for the name...
    first.connect(broker.endpoint)
    await first.send(p.encode(p.Claim(rid=1, name="dave")))
    assert isinstance(p.decode_reply(await asyncio.wait_for(first.recv(), 5)), p.Ok)
    first.close(linger=0)
    second = dealer()  # ...and its next handshake takes it, but it never says hello
    monitor = second.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    second.connect(broker.endpoint)
    await asyncio.wait_for(monitor.recv_multipart(), 5)
    await wait_for(lambda: "dave" in running.core.users, what="the claim")
    await wait_for(lambda: "dave" not in running.core.users, what="the unused claim to be released")
    close_monitored(second, monitor)
    owner = Client(broker.address, "dave", "the-real-dave-0123456789")
    assert (await owner.connect()).name == "dave"
    with pytest.raises(AuthError):  # the squatter's key owns nothing any more
        await Client(broker.address, "dave", squatter_secret).connect()
    await owner.close()
    await running.stop()


async def test_an_interactive_client_asks_once_then_the_pin_answers(tmp_path: Path, config_dir: Path) -> None:
    """zchat talk asks about a broker it does not know (off loopback; here loopback is
    treated as remote), shows the fingerprint, pins on yes; a no pins nothing; once
    pinned nobody is asked again."""
    running = await RunningBroker(tmp_path / "h.db", LIMITS, secure=True, key_dir=tmp_path).start()
    address = running.endpoint
    ctx = zmq.asyncio.Context.instance()
    asked: list[str] = []

    def answer(reply: bool):  # type: ignore[no-untyped-def]
        def confirm(question: str) -> bool:
            asked.append(question)
            return reply
        return confirm

    try:
        assert not await keys.ask_to_pin(address, ctx, answer(False), loopback_trusted=False)
        assert keys.pinned(address) is None and len(asked) == 1
        assert keys.fingerprint(running.broker.public_key) in asked[0]  # type: ignore[union-attr]
        assert await keys.ask_to_pin(address, ctx, answer(True), loopback_trusted=False)
        assert keys.pinned(address) == running.broker.public_key.decode()  # type: ignore[union-attr]
        assert await keys.ask_to_pin(address, ctx, answer(False), loopback_trusted=False)  # pinned: not asked
        assert len(asked) == 2
        keyed = keys.keyed_address(address, running.broker.public_key)  # type: ignore[union-attr]
        assert await keys.ask_to_pin(keyed, ctx, answer(False), loopback_trusted=False) and len(asked) == 2
    finally:
        await running.stop()


async def test_a_stale_plaintext_declaration_never_makes_a_client_speak_plain_to_a_curve_broker(tmp_path: Path) -> None:
    """fails on main (CI, session 5): a test stand-in's plaintext declaration outlived it; a
    CURVE broker later bound on its port was spoken to in PLAIN and never answered ("no
    answer from the broker within 5s", and the broker logged a mechanism mismatch)."""
    endpoint = f"tcp://127.0.0.1:{free_port_base()}"
    keys.declare_insecure(endpoint)  # as a stopped stand-in left it
    try:
        running = await RunningBroker(tmp_path / "h.db", LIMITS, bind=endpoint, secure=True, key_dir=tmp_path).start()
        try:
            # The broker's start ends the declaration: the bare endpoint is CURVE again...
            alice = Client(endpoint, "alice", "secret-of-alice-0123456789")
            assert (await alice.connect(timeout=15)).name == "alice"
            await alice.close()
            # ...and an address that names the key is CURVE whatever a parent process declared.
            keys.declare_insecure(endpoint)
            bob = Client(running.broker.address, "bob", "secret-of-bob-0123456789")  # type: ignore[union-attr]
            assert (await bob.connect(timeout=15)).name == "bob"
            await bob.close()
        finally:
            await running.stop()
    finally:
        keys.undeclare_insecure(endpoint)
