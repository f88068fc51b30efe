"""``zchat irc`` (a subprocess, on a CURVE broker subprocess) driven by the ``irc``
package, a Python IRC client library: registration, SASL PLAIN and PASS against the
accounts, JOIN with history, PRIVMSG both ways, NAMES, QUIT."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, collect, wait_for
from tests.irc_gateway.conftest import IrcProcess
from zchat.client import Client

irc_client = pytest.importorskip("irc.client", reason="the irc package is not installed (pip install irc)")

#: Seconds a test waits for the gateway to decide (a sign-in, a JOIN): longer than the
#: gateway's own deadlines (its Client's connect gives each step 5 s and a new name takes
#: four round trips; a request 10 s), so on a loaded machine the test does not give up
#: before the gateway has answered, and when it answers no the test says why at once.
DECIDE = 60.0
#: What ends registration other than 001, and a JOIN other than NAMES (irc event types;
#: a 432 does not: the client may give another nick).
NOT_REGISTERED = ("passwdmismatch", "nicknameinuse", "saslfail", "error", "disconnect")
NOT_JOINED = ("inviteonlychan", "toomanychannels", "nosuchchannel", "479", "error", "disconnect")


class Bot:
    """One irc.client connection, its reactor in a thread; records what arrives."""

    def __init__(self, port: int, nick: str, password: str | None = None, sasl: bool = False) -> None:
        self.reactor = irc_client.Reactor()
        self.events: list = []
        self.lock = threading.Lock()
        self.reactor.add_global_handler("all_events", self._record, -10)
        self.conn = self.reactor.server()
        self.conn.connect("127.0.0.1", port, nick, password=password, sasl_login=nick if sasl else None)
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while self.running:
            self.reactor.process_once(0.05)

    def _record(self, conn, event) -> None:  # type: ignore[no-untyped-def]
        with self.lock:
            self.events.append(event)

    def of(self, kind: str) -> list:
        with self.lock:
            return [e for e in self.events if e.type == kind]

    async def outcome(self, wanted: str, others: tuple[str, ...], what: str) -> object:
        """The first ``wanted`` event, once it or one of ``others`` came (within DECIDE);
        fails naming what came instead."""
        await wait_for(lambda: any(self.of(kind) for kind in (wanted, *others)), timeout=DECIDE, what=what)
        got = self.of(wanted)
        with self.lock:
            came = [f"{e.type} {e.arguments}" for e in self.events if e.type in others]
        assert got, f"no {what}: {'; '.join(came)}"
        return got[0]

    def do(self, method: str, *args: object) -> None:
        self.reactor.scheduler.execute_after(0, lambda: getattr(self.conn, method)(*args))

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)
        self.conn.close()


@pytest.fixture
def bots() -> Iterator[list[Bot]]:
    made: list[Bot] = []
    yield made
    for bot in made:
        bot.stop()


async def test_pass_signin_join_history_and_privmsg_both_ways(irc_proc: IrcProcess, broker_proc: BrokerProcess, bots) -> None:  # type: ignore[no-untyped-def]
    bob = Client(broker_proc.endpoint, "bob")
    await bob.connect()
    try:
        await bob.join("general")
        await bob.send("general", "said before alice came")
        bot = Bot(irc_proc.port, "alice", password="alice-password-1")
        bots.append(bot)
        await bot.outcome("welcome", NOT_REGISTERED, "001 for a first sign-in with PASS")
        bot.do("join", "#general")
        await bot.outcome("namreply", NOT_JOINED, "NAMES after JOIN")
        assert set(bot.of("namreply")[0].arguments[-1].split()) == {"alice", "bob"}
        await wait_for(lambda: bot.of("pubmsg"), timeout=DECIDE, what="history on JOIN")
        first = bot.of("pubmsg")[0]
        assert first.source.nick == "bob" and first.arguments == ["said before alice came"]  # a minute old or less: not dated
        bot.do("privmsg", "#general", "hello from the irc package")
        got = await collect(bob, 1, timeout=DECIDE, where=lambda m: m.sender == "alice" and m.kind == "text")
        assert got[0].text == "hello from the irc package"
        await bob.send("general", "live from zchat")
        await wait_for(lambda: len(bot.of("pubmsg")) >= 2, timeout=DECIDE, what="a live line")
        assert bot.of("pubmsg")[1].arguments == ["live from zchat"]
        bot.do("quit", "bye")
        await wait_for(lambda: bot.of("disconnect"), timeout=DECIDE, what="the gateway to close after QUIT")
    finally:
        await bob.close()


async def test_sasl_plain_and_its_failures(irc_proc: IrcProcess, bots) -> None:  # type: ignore[no-untyped-def]
    first = Bot(irc_proc.port, "carol", password="carol-password-1", sasl=True)
    bots.append(first)
    await first.outcome("welcome", NOT_REGISTERED, "001 after SASL PLAIN (the account is made)")
    assert first.of("loggedin") and first.of("saslsuccess") and not first.of("saslfail")
    wrong = Bot(irc_proc.port, "carol", password="not-carols-password", sasl=True)
    bots.append(wrong)
    await wait_for(lambda: wrong.of("saslfail"), timeout=DECIDE, what="904 for a wrong password")
    assert not wrong.of("welcome")


async def test_a_name_taken_on_the_broker_is_433(irc_proc: IrcProcess, broker_proc: BrokerProcess, bots, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dave = Client(broker_proc.endpoint, "dave")  # dave's name belongs to this key now
    await dave.connect()
    await dave.close()
    bot = Bot(irc_proc.port, "dave", password="someone-else-pw")
    bots.append(bot)
    await bot.outcome("nicknameinuse", ("welcome", *NOT_REGISTERED), "433 for a taken name")
    assert not bot.of("welcome")


def test_sigterm_tells_every_client_and_exits_cleanly(irc_proc: IrcProcess) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", irc_proc.port), timeout=20) as sock:
        sock.sendall(b"PASS erin-password-1\r\nNICK erin\r\nUSER erin 0 * :Erin\r\n")
        got = b""
        while b" 376 " not in got:
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk
        irc_proc.proc.terminate()
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
    assert b"ERROR :The gateway is shutting down\r\n" in got
    assert irc_proc.proc.wait(15) == 0


async def test_server_time_who_list_topic_and_bad_input(irc_proc: IrcProcess, broker_proc: BrokerProcess, bots) -> None:  # type: ignore[no-untyped-def]
    bob = Client(broker_proc.endpoint, "bob")
    await bob.connect()
    try:
        await bob.join("general")
        await bob.send("general", "stamped")
        bot = Bot(irc_proc.port, "frank", password="frank-password-1")
        bots.append(bot)
        await bot.outcome("welcome", NOT_REGISTERED, "001")
        bot.do("send_raw", "CAP REQ :server-time")  # after registration too
        await wait_for(lambda: bot.of("cap"), what="CAP ACK")
        bot.do("join", "#general")
        await wait_for(lambda: bot.of("pubmsg"), timeout=DECIDE, what="history on JOIN")
        tags = {t["key"]: t["value"] for t in bot.of("pubmsg")[0].tags or []}
        assert tags["time"].endswith("Z") and bot.of("pubmsg")[0].arguments == ["stamped"]
        bot.do("who", "#general")
        await wait_for(lambda: bot.of("endofwho"), timeout=DECIDE, what="WHO")
        assert sorted(e.arguments[4] for e in bot.of("whoreply")) == ["bob", "frank"]
        bot.do("list")
        await wait_for(lambda: bot.of("listend"), timeout=DECIDE, what="LIST")
        assert [(e.arguments[0], e.arguments[1]) for e in bot.of("list")] == [("#general", "2")]
        bot.do("topic", "#general")
        await wait_for(lambda: bot.of("notopic"), timeout=DECIDE, what="TOPIC")
        bot.do("join", "#bad!name")
        await wait_for(lambda: bot.of("479"), what="479 for a channel zchat cannot name")
        bot.do("join", "&local")
        await wait_for(lambda: bot.of("nosuchchannel"), what="403 for another channel prefix")
        bot.do("privmsg", "[nobody]", "hi")
        await wait_for(lambda: bot.of("nosuchnick"), what="401 for a nick zchat cannot name")
        bot.do("nick", "other")
        await wait_for(lambda: bot.of("447"), what="447: the nick is the zchat name")
        bot.reactor.scheduler.execute_after(0, lambda: bot.conn.socket.send(b"PRIVMSG #general :" + b"x" * 600 + b"\r\n"))
        await wait_for(lambda: bot.of("417"), what="417 for a line over 512 bytes")
        bot.do("privmsg", "#general", "still here")
        got = await collect(bob, 1, timeout=DECIDE, where=lambda m: m.sender == "frank" and m.kind == "text")
        assert got[0].text == "still here"
    finally:
        await bob.close()


async def test_a_bad_nick_at_registration_is_432(irc_proc: IrcProcess, bots) -> None:  # type: ignore[no-untyped-def]
    bot = Bot(irc_proc.port, "-bad-", password="some-password-1")
    bots.append(bot)
    await wait_for(lambda: bot.of("erroneusnickname"), what="432 for a nick zchat cannot name")
    bot.do("nick", "goodnick")
    await bot.outcome("welcome", NOT_REGISTERED, "001 once a good nick is given")


async def test_a_client_speaks_curve_to_a_broker_on_the_port_a_plaintext_test_broker_had(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The first test here flaked in full-suite runs only: bob spoke PLAIN to the CURVE
    broker subprocess (no answer: ConnectError) when an earlier test's plaintext broker
    had had its port, as that broker's declaration outlived it (one in a few dozen runs,
    as the suite's plaintext brokers pile up among the 12,000 test ports)."""
    from tests.conftest import HEARTBEAT, RunningBroker
    from zchat import keys
    from zchat.core import Limits

    plain = await RunningBroker(tmp_path / "plain.db", Limits(heartbeat=HEARTBEAT, rate=0)).start()
    endpoint = plain.endpoint
    await plain.stop()
    assert not keys.is_insecure(endpoint)  # its declaration ends with it
    keys.declare_insecure(endpoint)  # as a test's relay does (tests/integration/test_curve.py), for good
    curve = BrokerProcess(tmp_path / "curve.db", cli_env, "--heartbeat", str(HEARTBEAT))
    curve.port, curve.endpoint = int(endpoint.rpartition(":")[2]), endpoint
    curve.start()  # CURVE there now: BrokerProcess forgets that declaration too
    try:
        bob = Client(endpoint, "bob")
        assert not bob.plaintext
        await bob.connect()
        await bob.close()
    finally:
        curve.stop()
