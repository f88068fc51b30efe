"""The per-connection state machine with plain values: registration, CAP, SASL, PASS
and the checks commands pass before they reach zchat."""

from __future__ import annotations

import base64

from zchat.irc import session as s
from zchat.irc.lines import Line, LineError, parse


def feed(sess: s.Session, *raw: str) -> list:
    out: list = []
    for text in raw:
        out += sess.receive(parse(text.encode()))
    return out


def codes(out: list) -> list[str]:
    return [o.command if isinstance(o, Line) else type(o).__name__ for o in out]


def plain(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


def registered(nick: str = "alice") -> s.Session:
    sess = s.Session()
    out = feed(sess, "PASS pw", f"NICK {nick}", "USER u 0 * :r")
    assert out == [s.SignIn(nick.lower(), "pw", "pass")]
    assert "Ready" in codes(sess.signed_in(nick.lower()))
    return sess


def test_cap_ls_302_holds_registration_until_cap_end() -> None:
    sess = s.Session()
    out = feed(sess, "CAP LS 302", "NICK alice", "USER u 0 * :Real")
    assert codes(out) == ["CAP"]  # no SignIn, no welcome while CAP is open
    assert "sasl=PLAIN" in out[0].params[-1] and "server-time" in out[0].params[-1]
    assert "cap-notify" in sess.caps  # implied by 302
    out = feed(sess, "CAP REQ :server-time batch")
    assert out == [Line("CAP", ("alice", "ACK", "server-time batch"), "zchat")]
    assert feed(sess, "PASS pw") == []
    assert feed(sess, "CAP END") == [s.SignIn("alice", "pw", "pass")]
    out = sess.signed_in("alice")
    assert codes(out)[:5] == ["001", "002", "003", "004", "005"] and codes(out)[-1] == "Ready"
    assert sess.registered and {"server-time", "batch"} <= sess.caps


def test_cap_ls_without_version_has_no_values_and_req_of_unknown_is_nak() -> None:
    sess = s.Session()
    out = feed(sess, "CAP LS")
    assert "sasl " in out[0].params[-1] + " " and "=" not in out[0].params[-1]
    out = feed(sess, "CAP REQ :server-time unknown-cap")
    assert out[0].params[1] == "NAK" and "server-time" not in sess.caps
    assert feed(sess, "CAP LIST")[0].params[-1] == ""


def test_no_cap_registers_on_nick_and_user() -> None:
    sess = s.Session()
    assert feed(sess, "PASS pw", "USER u 0 * :r") == []
    assert feed(sess, "NICK Alice") == [s.SignIn("alice", "pw", "pass")]
    out = sess.signed_in("alice")
    # the nick becomes the zchat name (lower case), said with a NICK line before 001
    assert out[0] == Line("NICK", ("alice",), "Alice!Alice@zchat")
    assert sess.nick == "alice"


def test_sasl_plain_signs_in_before_cap_end() -> None:
    sess = s.Session()
    feed(sess, "CAP LS 302", "NICK bob", "USER u 0 * :r", "CAP REQ sasl")
    assert feed(sess, "AUTHENTICATE PLAIN") == [Line("AUTHENTICATE", ("+",), "zchat")]
    assert feed(sess, f"AUTHENTICATE {plain('', 'bob', 'pw')}") == [s.SignIn("bob", "pw", "sasl")]
    out = sess.signed_in("bob")
    assert codes(out) == ["900", "903"]  # still negotiating: no welcome yet
    out = feed(sess, "CAP END")
    assert codes(out)[0] == "001" and sess.account == "bob"


def test_sasl_failure_is_904_and_leaves_the_connection_open() -> None:
    sess = s.Session()
    feed(sess, "CAP LS 302", "NICK bob", "USER u 0 * :r", "CAP REQ sasl", "AUTHENTICATE PLAIN")
    feed(sess, f"AUTHENTICATE {plain('', 'bob', 'wrong')}")
    out = sess.signed_in("bob", "wrong password")
    assert codes(out) == ["904"] and not sess.closed
    assert codes(feed(sess, "AUTHENTICATE SCRAM-SHA-256")) == ["908", "904"]
    assert codes(feed(sess, "AUTHENTICATE PLAIN", "AUTHENTICATE *")) == ["AUTHENTICATE", "906"]
    assert codes(feed(sess, "AUTHENTICATE PLAIN", "AUTHENTICATE !!notbase64")) == ["AUTHENTICATE", "904"]
    assert codes(feed(sess, "AUTHENTICATE PLAIN", f"AUTHENTICATE {plain('', 'Bad Name', 'x')}")) == ["AUTHENTICATE", "904"]


def test_sasl_without_the_cap_fails_and_long_responses_are_905() -> None:
    sess = s.Session()
    assert codes(feed(sess, "AUTHENTICATE PLAIN")) == ["904"]
    feed(sess, "CAP REQ sasl", "AUTHENTICATE PLAIN")
    out = feed(sess, *["AUTHENTICATE " + "A" * 400] * 4)
    assert codes(out) == ["905"]


def test_sasl_chunks_of_400_are_joined() -> None:
    sess = s.Session()
    feed(sess, "CAP REQ sasl", "AUTHENTICATE PLAIN")
    payload = plain("", "bob", "p" * 400)
    chunks = [payload[i : i + 400] for i in range(0, len(payload), 400)]
    assert len(chunks[0]) == 400
    out = feed(sess, *(f"AUTHENTICATE {c}" for c in chunks))
    assert out == [s.SignIn("bob", "p" * 400, "sasl")]


def test_pass_failures_close_with_464_or_433() -> None:
    sess = s.Session()
    feed(sess, "PASS pw", "NICK alice", "USER u 0 * :r")
    out = sess.signed_in("alice", "wrong password")
    assert codes(out) == ["464", "Quit"] and sess.closed
    sess = s.Session()
    feed(sess, "PASS pw", "NICK alice", "USER u 0 * :r")
    out = sess.signed_in("alice", "the name is taken", taken=True)
    assert codes(out) == ["433", "Quit"]


def test_no_password_is_refused_with_accounts_and_taken_without() -> None:
    sess = s.Session()
    out = feed(sess, "NICK alice", "USER u 0 * :r")
    assert codes(out) == ["464", "Quit"]
    sess = s.Session(accounts=False)
    assert feed(sess, "NICK alice", "USER u 0 * :r") == [s.SignIn("alice", "", "none")]


def test_bad_nicks_are_432_and_change_nothing() -> None:
    sess = s.Session()
    for nick in ("-dash", "[bot]", "a" * 33, "émile"):
        out = feed(sess, f"NICK {nick}")
        assert codes(out) == ["432"], nick
    assert sess.nick == ""
    assert codes(feed(sess, "NICK")) == ["431"]


def test_commands_before_registration_are_451() -> None:
    sess = s.Session()
    assert codes(feed(sess, "JOIN #general", "PRIVMSG #a :x")) == ["451", "451"]
    assert codes(feed(sess, "PING tok")) == ["PONG"]


def test_after_registration() -> None:
    sess = registered()
    assert codes(feed(sess, "NICK bob")) == ["447"]
    assert feed(sess, "NICK alice") == []
    assert codes(feed(sess, "PASS x", "USER a 0 * :b")) == ["462", "462"]
    assert codes(feed(sess, "FROB x")) == ["421"]


def test_join_maps_channels_and_refuses_the_others() -> None:
    sess = registered()
    out = feed(sess, "JOIN #General,#bad!name,&local,#ok.room")
    assert codes(out) == ["479", "403", "Join", "Join"]
    assert [o.room for o in out if isinstance(o, s.Join)] == ["general", "ok.room"]
    assert feed(sess, "JOIN 0") == [s.PartAll()]
    assert codes(feed(sess, "JOIN")) == ["461"]


def test_privmsg_targets_actions_and_ctcp() -> None:
    sess = registered()
    assert feed(sess, "PRIVMSG #general :hi there") == [s.Say("#general", "hi there", room="general")]
    assert feed(sess, "PRIVMSG Bob :psst") == [s.Say("Bob", "psst", to="bob")]
    assert feed(sess, "PRIVMSG #general :\x01ACTION waves\x01") == [s.Say("#general", "waves", room="general", me=True)]
    assert feed(sess, "PRIVMSG bob :\x01VERSION\x01") == []
    assert codes(feed(sess, "PRIVMSG [x] :hi")) == ["401"]
    assert codes(feed(sess, "PRIVMSG #bad!ch :hi")) == ["479"]
    assert codes(feed(sess, "PRIVMSG")) == ["411"]
    assert codes(feed(sess, "PRIVMSG #a")) == ["412"]
    assert codes(feed(sess, "PRIVMSG #a :   ")) == ["412"]
    assert feed(sess, "NOTICE [x] :never answered") == []  # RFC: no error replies to NOTICE


def test_query_commands() -> None:
    sess = registered()
    assert feed(sess, "NAMES #general") == [s.Names("general")]
    assert feed(sess, "WHO #general") == [s.Who("general", "#general")]
    assert codes(feed(sess, "WHO bob")) == ["315"]
    assert feed(sess, "LIST") == [s.ListRooms()]
    assert codes(feed(sess, "TOPIC #general", "TOPIC #general :new", "TOPIC #bad!x")) == ["331", "482", "479"]
    assert codes(feed(sess, "MODE #general", "MODE alice", "MODE #general b")) == ["324", "221", "368"]
    assert feed(sess, "QUIT :bye")[0].reason == "bye" and sess.closed
    assert feed(sess, "PING x") == []  # nothing after QUIT


def test_bad_line_numerics() -> None:
    sess = registered()
    assert codes(sess.bad_line(LineError("too_long", "x", "PRIVMSG"))) == ["417"]
    out = sess.bad_line(LineError("utf8", "x", "PRIVMSG"))
    assert out == [Line("FAIL", ("PRIVMSG", "INVALID_UTF8", out[0].params[-1]), "zchat")]


def test_chathistory_requests() -> None:
    sess = registered()
    assert feed(sess, "CHATHISTORY LATEST #general * 500") == [s.History("#general", "general", s.MAX_CHATHISTORY)]
    assert feed(sess, "CHATHISTORY BEFORE #general msgid=42.ab-1 10") == [s.History("#general", "general", 10, before=42)]
    assert feed(sess, "CHATHISTORY AFTER Bob msgid=7.x 5") == [s.History("Bob", "@alice:bob", 5, after=7, newest=False)]
    for bad in ("CHATHISTORY LATEST #general *", "CHATHISTORY BETWEEN #a * * 5", "CHATHISTORY BEFORE #a timestamp=x 5",
                "CHATHISTORY LATEST #bad!x * 5", "CHATHISTORY LATEST #a * lots"):
        out = feed(sess, bad)
        assert codes(out) == ["FAIL"] and out[0].params[0] == "CHATHISTORY", bad
