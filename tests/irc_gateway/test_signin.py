"""Sign-in against the accounts of ``zchat web`` (zchat.accounts), over a plain socket
on a real broker: the first sign-in makes the account and claims the name, a wrong
password, a short one, a taken name, no password and too many attempts each get their
numeric, and nothing else changes."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import RunningBroker, wait_for
from tests.irc_gateway.conftest import Peer, open_peer
from zchat.accounts import Accounts, SignInLimiter
from zchat.client import Client
from zchat.irc.server import Gateway
from zchat.irc.signin import Gatekeeper


@pytest.fixture
async def signed(broker: RunningBroker, tmp_path: Path) -> AsyncIterator[tuple[Gateway, int, Accounts]]:
    accounts = Accounts(tmp_path / "accounts")
    gw = Gateway(broker.endpoint, Gatekeeper(accounts, SignInLimiter(per_minute=60, burst=4)))
    port = await gw.start("127.0.0.1", 0)
    yield gw, port, accounts
    await gw.stop()


async def attempt(port: int, nick: str, password: str | None) -> Peer:
    peer = await open_peer(port)
    if password is not None:
        peer.send(f"PASS :{password}")
    peer.send(f"NICK {nick}", f"USER {nick} 0 * :{nick}")
    return peer


async def test_first_pass_makes_the_account_then_the_password_must_match(signed) -> None:  # type: ignore[no-untyped-def]
    _, port, accounts = signed
    first = await attempt(port, "alice", "alice-password-1")
    await first.cmd("001")
    assert "alice" in accounts and accounts.verify("alice", "alice-password-1")
    first.send("QUIT")
    await wait_for(lambda: first.closed, what="the first connection to close")
    again = await attempt(port, "alice", "alice-password-1")
    await again.cmd("001")
    wrong = await attempt(port, "alice", "not-the-password")
    err = await wrong.cmd("464")
    assert "wrong name or password" in err.params[-1]
    await wrong.cmd("ERROR")
    await wait_for(lambda: wrong.closed, what="the refused connection to close")
    assert not [x for x in wrong.lines if x.command == "001"]
    for peer in (first, again, wrong):
        await peer.close()


async def test_sasl_plain_signs_in_and_a_wrong_password_is_904(signed) -> None:  # type: ignore[no-untyped-def]
    _, port, accounts = signed
    accounts.create("bob", "bob-password-1")

    async def sasl(password: str) -> Peer:
        peer = await open_peer(port)
        peer.send("CAP LS 302", "NICK bob", "USER bob 0 * :b", "CAP REQ :sasl", "AUTHENTICATE PLAIN")
        await peer.expect(lambda x: x.command == "AUTHENTICATE" and x.params == ("+",))
        peer.send("AUTHENTICATE " + base64.b64encode(f"\0bob\0{password}".encode()).decode())
        return peer

    bad = await sasl("wrong-password")
    assert "wrong name or password" in (await bad.cmd("904")).params[-1]
    bad.send("CAP END")  # then no password at all: refused
    await bad.cmd("464")
    good = await sasl("bob-password-1")
    logged = await good.cmd("900")
    assert logged.params[2] == "bob"
    await good.cmd("903")
    good.send("CAP END")
    assert (await good.cmd("001")).params[0] == "bob"
    for peer in (bad, good):
        await peer.close()


async def test_a_short_password_makes_no_account(signed) -> None:  # type: ignore[no-untyped-def]
    _, port, accounts = signed
    peer = await attempt(port, "carol", "short")
    assert "at least 8" in (await peer.cmd("464")).params[-1]
    assert "carol" not in accounts
    await peer.close()


async def test_no_password_is_464(signed) -> None:  # type: ignore[no-untyped-def]
    _, port, accounts = signed
    peer = await attempt(port, "dora", None)
    assert "Password required" in (await peer.cmd("464")).params[-1]
    await peer.cmd("ERROR")
    assert "dora" not in accounts
    await peer.close()


async def test_a_name_taken_on_the_broker_is_433_and_leaves_no_account(signed, broker) -> None:  # type: ignore[no-untyped-def]
    _, port, accounts = signed
    owner = Client(broker.endpoint, "dave", "secret-of-dave-0123456789")
    await owner.connect()
    await owner.close()
    peer = await attempt(port, "dave", "dave-password-1")
    err = await peer.cmd("433")
    assert err.params[1] == "dave"
    await peer.cmd("ERROR")
    assert "dave" not in accounts  # made for this sign-in, removed when the broker said no
    await peer.close()


async def test_too_many_attempts_are_refused(signed) -> None:  # type: ignore[no-untyped-def]
    _, port, accounts = signed
    accounts.create("erin", "erin-password-1")
    peers = []
    for _ in range(4):
        peer = await attempt(port, "erin", "guess-guess")
        await peer.cmd("464")
        peers.append(peer)
    peer = await attempt(port, "erin", "erin-password-1")  # even the right one, for now
    assert "too many sign-in attempts" in (await peer.cmd("464")).params[-1]
    for p_ in [*peers, peer]:
        await p_.close()
