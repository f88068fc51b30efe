"""Private rooms and moderation on real CURVE brokers and clients on 127.0.0.1, with a
raw SUB peer that keeps a subscription it was once allowed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from tests.conftest import HEARTBEAT, RunningBroker, chat, collect, wait_for
from zchat import keys
from zchat import protocol as p
from zchat.client import Client, ClientError
from zchat.recovery import Gap

LIMITS_KW = {"heartbeat": HEARTBEAT, "rate": 0}


def secret(name: str) -> str:
    return f"secret-of-{name}-0123456789"


@pytest.fixture
async def secure(tmp_path: Path) -> AsyncIterator[RunningBroker]:
    from zchat.core import Limits

    running = await RunningBroker(tmp_path / "h.db", Limits(**LIMITS_KW), secure=True, key_dir=tmp_path / "k", admins=("root",)).start()  # type: ignore[arg-type]
    yield running
    await running.stop()


@pytest.fixture
async def user(secure: RunningBroker) -> AsyncIterator[Callable[[str], Awaitable[Client]]]:
    clients: list[Client] = []

    async def make(name: str) -> Client:
        client = Client(secure.broker.address, name, secret(name))  # type: ignore[union-attr]
        await client.connect()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


class RawSub:
    """A hostile SUB with ``name``'s key: subscribes once, while allowed, and never lets go."""

    def __init__(self, running: RunningBroker, name: str) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.linger = 0
        public, secret_key = keys.keypair_from_secret(secret(name), name)
        self.sock.curve_serverkey = running.broker.public_key  # type: ignore[union-attr]
        self.sock.curve_publickey, self.sock.curve_secretkey = public, secret_key
        self.sock.connect(f"tcp://127.0.0.1:{running.broker.ports[2]}")  # type: ignore[union-attr]
        self.got: list[p.Msg] = []
        self.task: asyncio.Task | None = None

    def subscribe(self, topic: bytes) -> None:
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)

    def start(self) -> None:
        async def read() -> None:
            while True:
                _, body = await self.sock.recv_multipart()
                event = p.decode_event(body)
                self.got += event.items if isinstance(event, p.Batch) else [event] if isinstance(event, p.Msg) else []

        self.task = asyncio.ensure_future(read())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.sock.close(linger=0)


async def until_heard(raw: RawSub, sender: Client, room: str, core: object) -> None:
    """Send probes until the raw SUB hears one: its subscription is in force (a positive
    wait, each probe a fresh chance, rather than a guess at how long it takes)."""
    for i in range(100):
        await sender.send(room, f"probe {i}")
        try:
            await wait_for(lambda: any(m.text.startswith("probe") for m in raw.got), timeout=0.2)
            return
        except AssertionError:
            continue
    raise AssertionError(f"the raw SUB never heard {room}: counters {core.counters}")  # type: ignore[attr-defined]


async def private_room(user: Callable[[str], Awaitable[Client]], *names: str) -> list[Client]:
    alice = await user("alice")
    await alice.join("sec", private=True)
    clients = [alice]
    for name in names:
        client = await user(name)
        await alice.invite("sec", name)
        await client.join("sec")
        clients.append(client)
    return clients


async def texts(client: Client, count: int) -> list[p.Msg]:
    return await chat(client, count)


@pytest.mark.parametrize("how", ["kick", "ban", "part"])
async def test_a_removed_member_and_its_raw_subscription_hear_nothing_while_the_rest_miss_nothing(
    secure: RunningBroker, user: Callable[[str], Awaitable[Client]], how: str
) -> None:
    alice, bob, carol = await private_room(user, "bob", "carol")
    for client in (alice, bob):
        await client.join("pub")  # the raw SUB's own marker comes on this public room
    raw = RawSub(secure, "bob")
    old = p.room_topic("sec", secure.core.tokens["sec"])
    raw.subscribe(old)
    raw.subscribe(p.room_topic("pub"))
    raw.start()
    await until_heard(raw, alice, "sec", secure.core)
    if how == "part":
        await bob.part("sec")
    else:
        await getattr(alice, how)("sec", "bob", "bye")
    # Sent at once: published before carol had the new topic, so she must fetch them.
    for i in range(20):
        await alice.send("sec", f"after {i}")
    got = await collect(carol, 20, where=lambda m: m.kind == "text" and m.text.startswith("after"))
    assert [m.text for m in got] == [f"after {i}" for i in range(20)]
    seqs = [m.seq for m in got]
    assert seqs == list(range(seqs[0], seqs[0] + 20))
    await alice.send("sec", "marker")
    assert [m.text for m in await texts(carol, 1)] == ["marker"]  # the remaining member has it
    # A line on the raw SUB's other subscription, published after everything above: once
    # it arrived, whatever the broker sent that pipe before it has arrived too (in order).
    await alice.send("pub", "raw marker")
    await wait_for(lambda: any(m.text == "raw marker" for m in raw.got), what="the raw SUB's own marker")
    leaked = [m for m in raw.got if m.room == "sec" and m.seq > got[0].seq - 2 and m.kind == "text"]
    assert leaked == [], "a raw SUB kept reading the private room"
    assert secure.core.counters.get("rotations", 0) >= 1
    if how != "part":
        assert "sec" not in bob._trackers and "sec" not in bob._subscribed
    await raw.close()


async def test_remaining_members_see_no_gap_event(secure: RunningBroker, user: Callable[[str], Awaitable[Client]]) -> None:
    alice, _bob, carol = await private_room(user, "bob", "carol")
    await alice.kick("sec", "bob")
    for i in range(5):
        await alice.send("sec", f"n{i}")
    events = await collect(carol, 5, kinds=(p.Msg, Gap), where=lambda e: isinstance(e, Gap) or e.kind == "text")
    assert not any(isinstance(e, Gap) for e in events)


async def test_non_members_are_refused_subscribe_history_who_and_rooms_and_an_invite_admits_at_once(
    secure: RunningBroker, user: Callable[[str], Awaitable[Client]]
) -> None:
    (alice,) = await private_room(user)
    await alice.join("lobby")
    await alice.send("sec", "secret line")
    dave = await user("dave")
    for call in (lambda: dave.history("sec"), lambda: dave.who("sec"), lambda: dave.join("sec")):
        with pytest.raises(ClientError) as refused:
            await call()
        assert refused.value.code == p.ErrorCode.FORBIDDEN and "private" in refused.value.message
    assert [r.name for r in await dave.rooms()] == ["lobby"]
    assert [(r.name, r.private) for r in await alice.rooms()] == [("lobby", False), ("sec", True)]
    # A raw SUB of dave's asking for the room's topic is refused by the broker.
    before = secure.core.counters.get("bad_subscription", 0)
    raw = RawSub(secure, "dave")
    raw.subscribe(p.room_topic("sec", secure.core.tokens["sec"]))
    await wait_for(lambda: secure.core.counters.get("bad_subscription", 0) > before, what="the refusal")
    await raw.close()
    await alice.invite("sec", "dave")
    await dave.join("sec")
    assert [m.text for m in await dave.history("sec") if m.kind == "text"] == ["secret line"]
    assert {m.name for m in await dave.who("sec")} == {"alice", "dave"}
    await alice.send("sec", "welcome")
    assert [m.text for m in await texts(dave, 1)] == ["welcome"]
    assert "sec" in [r.name for r in await dave.rooms()]


async def test_operator_actions_are_sequenced_lines_and_non_operators_are_forbidden(
    secure: RunningBroker, user: Callable[[str], Awaitable[Client]]
) -> None:
    alice, bob, carol = await private_room(user, "bob", "carol")
    for call in (
        lambda: bob.invite("sec", "carol"), lambda: bob.kick("sec", "carol"), lambda: bob.ban("sec", "carol"),
        lambda: bob.unban("sec", "carol"), lambda: bob.set_topic("sec", "mine"), lambda: bob.op("sec", "bob"),
        lambda: bob.deop("sec", "alice"),
    ):
        with pytest.raises(ClientError) as refused:
            await call()
        assert refused.value.code == p.ErrorCode.FORBIDDEN and "operators" in refused.value.message
    await alice.set_topic("sec", "plans")
    await alice.op("sec", "bob")
    await bob.deop("sec", "alice")
    await bob.ban("sec", "alice", "coup")
    await bob.unban("sec", "alice")
    lines = await collect(carol, 5, where=lambda m: m.kind not in ("text", "me", "join", "part", "invite"))
    assert [(m.kind, m.sender, m.to, m.text) for m in lines] == [
        ("topic", "alice", "", "plans"), ("op", "alice", "bob", ""), ("deop", "bob", "alice", ""),
        ("ban", "bob", "alice", "coup"), ("unban", "bob", "alice", ""),
    ]
    seqs = [m.seq for m in lines]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    with pytest.raises(ClientError) as refused:
        await alice.join("sec")  # unbanned, but a private room wants an invite
    assert refused.value.code == p.ErrorCode.FORBIDDEN
    assert (await carol.who("sec"))[0] == p.Member("bob", True, True)


async def test_settings_survive_a_broker_restart(tmp_path: Path) -> None:
    from zchat.core import Limits

    running = await RunningBroker(tmp_path / "h.db", Limits(**LIMITS_KW), secure=True, key_dir=tmp_path / "k").start()  # type: ignore[arg-type]
    alice = Client(running.broker.address, "alice", secret("alice"))  # type: ignore[union-attr]
    await alice.connect()
    await alice.join("sec", private=True)
    await alice.set_topic("sec", "kept")
    await alice.close()
    await running.stop()
    await running.start()
    core = running.core
    assert "sec" in core.private and core.is_op("sec", "alice") and core.topic_of("sec") == "kept"
    assert core.tokens["sec"]
    await running.stop()


async def test_a_kick_in_a_public_room_ends_an_old_subscription_too(
    secure: RunningBroker, user: Callable[[str], Awaitable[Client]]
) -> None:
    alice, bob, carol = await user("alice"), await user("bob"), await user("carol")
    for client in (alice, bob, carol):
        await client.join("pub")
    raw = RawSub(secure, "bob")
    raw.subscribe(p.room_topic("pub"))
    raw.start()
    await until_heard(raw, alice, "pub", secure.core)
    await alice.ban("pub", "bob")
    await alice.send("pub", "after")
    await collect(carol, 1, where=lambda m: m.text == "after")
    assert not [m for m in raw.got if m.text == "after"]
    with pytest.raises(ClientError):
        await bob.join("pub")
    await raw.close()


# ------------------------------------------------------------------ broker admins


async def test_an_admin_ban_ends_live_sessions_and_refuses_the_next_handshake(
    secure: RunningBroker, user: Callable[[str], Awaitable[Client]]
) -> None:
    root, bob = await user("root"), await user("bob")
    await bob.join("lobby")
    with pytest.raises(ClientError) as refused:
        await bob.admin_ban("root")
    assert refused.value.code == p.ErrorCode.FORBIDDEN
    await root.admin_ban("bob")
    await wait_for(lambda: bob.state == "closed", what="bob's live session to end")
    assert not secure.core.online("bob")
    again = Client(secure.broker.address, "bob", secret("bob"))  # type: ignore[union-attr]
    with pytest.raises(ClientError):
        await again.connect(timeout=2.0)
    await root.admin_unban("bob")
    back = Client(secure.broker.address, "bob", secret("bob"))  # type: ignore[union-attr]
    await back.connect()
    await back.close()


async def test_an_admin_delete_leaves_a_tombstone_and_tells_every_client(
    secure: RunningBroker, user: Callable[[str], Awaitable[Client]]
) -> None:
    root, bob, carol = await user("root"), await user("bob"), await user("carol")
    for client in (bob, carol):
        await client.join("lobby")
    stored = await bob.send("lobby", "something awful")
    await bob.send("lobby", "fine")
    with pytest.raises(ClientError) as refused:
        await carol.delete("lobby", stored.seq)
    assert refused.value.code == p.ErrorCode.FORBIDDEN
    await root.delete("lobby", stored.seq)
    for client in (bob, carol):
        (line,) = await collect(client, 1, where=lambda m: m.kind == "delete")
        assert (line.sender, line.text) == ("root", str(stored.seq))
    history = {m.seq: m for m in await carol.history("lobby")}
    assert (history[stored.seq].kind, history[stored.seq].text) == ("deleted", "")
    assert history[stored.seq + 1].text == "fine"
    with pytest.raises(ClientError):
        await root.delete("lobby", 999)


async def test_an_admin_releases_a_squatted_name(secure: RunningBroker, user: Callable[[str], Awaitable[Client]]) -> None:
    root = await user("root")
    (alice, squat) = await private_room(user, "squat")
    await squat.join("lobby")
    await root.release("squat")
    await wait_for(lambda: squat.state == "closed", what="the squatter's session to end")
    assert "squat" not in secure.core.users and "squat" not in secure.core.members.get("sec", ())
    assert "squat" not in secure.broker.name_keys  # type: ignore[union-attr]
    # Someone else may claim the name now, and inherits none of its rooms.
    heir = Client(secure.broker.address, "squat", "another-secret-0123456789xyz")  # type: ignore[union-attr]
    welcome = await heir.connect()
    assert welcome.name == "squat" and welcome.rooms == {}
    with pytest.raises(ClientError):
        await heir.history("sec")
    await heir.close()
    kicks = await collect(alice, 1, where=lambda m: m.kind == "kick")
    assert kicks[0].to == "squat" and kicks[0].sender == "root"


async def test_members_keep_receiving_a_private_room_across_a_broker_restart(tmp_path: Path) -> None:
    from zchat.core import Limits

    running = await RunningBroker(tmp_path / "h.db", Limits(**LIMITS_KW), secure=True, key_dir=tmp_path / "k").start()  # type: ignore[arg-type]
    address = running.broker.address  # type: ignore[union-attr]
    alice, bob = Client(address, "alice", secret("alice")), Client(address, "bob", secret("bob"))
    try:
        for client in (alice, bob):
            await client.connect()
        await alice.join("sec", private=True)
        await alice.invite("sec", "bob")
        await bob.join("sec")
        old = running.core.tokens["sec"]
        await running.stop()
        await running.start()  # same ports and key; new tokens
        assert running.core.tokens["sec"] != old
        await wait_for(lambda: bob._tokens.get("sec") == running.core.tokens["sec"], timeout=15, what="bob to learn the new topic")
        await alice.send("sec", "after the restart", timeout=15)
        assert [m.text for m in await chat(bob, 1, timeout=15)] == ["after the restart"]
    finally:
        await alice.close()
        await bob.close()
        await running.stop()


async def test_the_next_owner_of_a_released_name_reads_and_edits_nothing_of_the_earlier_one(
    secure: RunningBroker, user: Callable[[str], Awaitable[Client]]
) -> None:
    """A released name is a new user's: the earlier owner's DMs stay with its peers (the
    heir reads only what comes after, in either history order and in search), and its
    lines in rooms are not the heir's to edit or delete."""
    root, bob = await user("root"), await user("bob")
    old = await user("alice")
    await old.join("lobby")
    secret_line = await old.send_dm("bob", "the secret plan")
    hello = await old.send("lobby", "hello from the first alice")
    await root.release("alice")
    await wait_for(lambda: old.state == "closed", what="the earlier owner's session to end")

    heir = Client(secure.broker.address, "alice", "another-secret-0123456789xyz")  # type: ignore[union-attr]
    await heir.connect()
    try:
        mine = await heir.send_dm("bob", "hi, I am the new alice")
        assert mine.room == secret_line.room and mine.seq > secret_line.seq  # the same conversation id
        assert [m.text for m in await heir.history(mine.room) if m.kind == "text"] == ["hi, I am the new alice"]
        assert [m.text for m in await heir.history(mine.room, after=0) if m.kind == "text"] == ["hi, I am the new alice"]
        assert (await heir.search("secret"))[0] == []
        await heir.join("lobby")
        for work in (lambda: heir.edit("lobby", hello.seq, "rewritten by the heir"), lambda: heir.delete_own("lobby", hello.seq)):
            with pytest.raises(ClientError) as info:
                await work()
            assert info.value.code == p.ErrorCode.FORBIDDEN
        # The peer keeps the whole conversation; the room keeps the earlier owner's line.
        assert [m.text for m in await bob.history(mine.room) if m.kind == "text"] == ["the secret plan", "hi, I am the new alice"]
        assert [m.text for m in await bob.history("lobby") if m.seq == hello.seq] == ["hello from the first alice"]
    finally:
        await heir.close()
