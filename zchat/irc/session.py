"""One IRC connection's state, sans I/O: registration, CAP, SASL PLAIN, PASS, and
the checks every command passes before it reaches zchat.

``receive(line)`` returns what to do: Lines to send back and Actions for the gateway
(sign in, join, send, ...). The gateway runs an action on its ``zchat.client.Client``
and may report back (``signed_in``). Nothing here touches a socket or a clock, so
its tests are plain values (tests/irc_gateway/test_session.py).

Registration ends when NICK and USER are in, CAP negotiation (if the client started
one) has ended, and the user is signed in: by SASL PLAIN during CAP, by PASS at the
end, or (a gateway without accounts) by the nick alone.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses

from zchat.irc import numerics as n
from zchat.irc.lines import Line, LineError
from zchat.irc.names import channel_to_room, is_channel, nick_to_name
from zchat.protocol import dm_room

#: The capabilities offered (IRCv3). sasl's value is only sent to CAP LS 302 clients.
CAPS = ("cap-notify", "sasl", "server-time", "message-tags", "echo-message", "batch", "away-notify", "draft/chathistory")
#: Targets one line may name (ISUPPORT TARGMAX): bounds the work one line causes.
MAX_TARGETS = {"PRIVMSG": 4, "NOTICE": 4, "JOIN": 10, "PART": 10, "NAMES": 10}
#: Most messages one CHATHISTORY request returns (ISUPPORT CHATHISTORY).
MAX_CHATHISTORY = 100
#: A SASL response is sent in 400-byte chunks; more than this in all is refused (905).
MAX_SASL = 1200


@dataclasses.dataclass(frozen=True)
class SignIn:
    """Check ``name``'s password (``via`` is 'sasl', 'pass' or 'none') and connect as it."""

    name: str
    password: str
    via: str


@dataclasses.dataclass(frozen=True)
class Ready:
    """Registration is complete: the gateway starts delivering zchat events."""


@dataclasses.dataclass(frozen=True)
class Join:
    room: str


@dataclasses.dataclass(frozen=True)
class Part:
    room: str
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class PartAll:
    """JOIN 0: leave every joined channel."""


@dataclasses.dataclass(frozen=True)
class Say:
    """A line for a room or, with ``to``, a DM. ``target`` is the IRC target as given
    (for echo-message and error replies); ``notice`` lines never get error replies."""

    target: str
    text: str
    room: str = ""
    to: str = ""
    me: bool = False
    notice: bool = False


@dataclasses.dataclass(frozen=True)
class Names:
    room: str


@dataclasses.dataclass(frozen=True)
class Who:
    room: str
    mask: str


@dataclasses.dataclass(frozen=True)
class History:
    """CHATHISTORY: up to ``limit`` stored lines of ``room`` (a room or DM id) with
    ``after < seq < before`` (0: no bound), the newest if ``newest``; ``target`` as given."""

    target: str
    room: str
    limit: int
    before: int = 0
    after: int = 0
    newest: bool = True


@dataclasses.dataclass(frozen=True)
class ListRooms:
    """LIST: every room from the broker."""


@dataclasses.dataclass(frozen=True)
class Quit:
    reason: str
    error: str = ""  # set: the connection is closed by the server with this ERROR text


Action = SignIn | Ready | Join | Part | PartAll | Say | Names | Who | ListRooms | History | Quit
Out = Line | Action


class Session:
    """The state of one IRC connection (see the module docstring)."""

    def __init__(self, server: str = "zchat", accounts: bool = True, network: str = "zchat") -> None:
        self.server = server
        self.network = network
        self.accounts = accounts  # False: the nick alone signs in (a personal gateway)
        self.nick = ""  # as the client wrote it, until registration; then the account name
        self.user = ""
        self.password = ""
        self.account = ""  # the signed-in zchat name
        self.caps: set[str] = set()
        self.cap_version = 0
        self.negotiating = False  # CAP LS/REQ seen and no CAP END yet
        self.registered = False
        self.signing_in = False
        self.via = ""  # how the SignIn in progress signs in
        self.sasl: str | None = None  # None, or the chunks of a PLAIN response so far
        self.closed = False

    # ------------------------------------------------------------ helpers

    @property
    def me(self) -> str:
        return self.nick or "*"

    def reply(self, code: str, *params: str) -> Line:
        return Line(code, (self.me, *params), self.server)

    def fail(self, command: str, code: str, text: str) -> Line:
        """An IRCv3 standard reply (FAIL): for errors with no numeric (invalid UTF-8)."""
        return Line("FAIL", (command, code, text), self.server)

    @property
    def hostmask(self) -> str:
        return f"{self.me}!{self.me}@zchat"

    # ------------------------------------------------------------ input

    def bad_line(self, err: LineError) -> list[Out]:
        """A line the splitter or parser refused."""
        if err.reason == "too_long":
            return [self.reply(n.ERR_INPUTTOOLONG, "Input line was too long")]
        if err.reason == "utf8":
            return [self.fail(err.command, "INVALID_UTF8", "Message rejected: it is not valid UTF-8")]
        return []

    def receive(self, line: Line) -> list[Out]:
        """One parsed line from the client: what to answer and what to do."""
        if self.closed:
            return []
        cmd = line.command
        handler = getattr(self, "_pre_" + cmd.lower(), None) if cmd.isalpha() else None
        if handler is not None:
            return handler(line)
        if not self.registered:
            if cmd in ("PONG",):
                return []
            return [self.reply(n.ERR_NOTREGISTERED, "You have not registered")]
        handler = getattr(self, "_cmd_" + cmd.lower(), None) if cmd.isalpha() else None
        if handler is None:
            return [self.reply(n.ERR_UNKNOWNCOMMAND, cmd[:32], "Unknown command")]
        return handler(line)

    def _need(self, line: Line, count: int) -> Line | None:
        if len(line.params) < count or (count and not line.params[count - 1]):
            return self.reply(n.ERR_NEEDMOREPARAMS, line.command, "Not enough parameters")
        return None

    # ------------------------------------------------------------ any time

    def _pre_ping(self, line: Line) -> list[Out]:
        if (err := self._need(line, 1)) is not None:
            return [err]
        return [Line("PONG", (self.server, line.params[0]), self.server)]

    def _pre_quit(self, line: Line) -> list[Out]:
        self.closed = True
        reason = line.params[0] if line.params else ""
        return [Quit(reason, error=f"Closing link: {self.me} (Quit: {reason})")]

    def _pre_cap(self, line: Line) -> list[Out]:
        if (err := self._need(line, 1)) is not None:
            return [err]
        sub = line.params[0].upper()
        if sub == "LS":
            self.negotiating = not self.registered
            version = line.params[1] if len(line.params) > 1 else ""
            self.cap_version = max(self.cap_version, int(version) if version.isdigit() and len(version) < 5 else 0)
            if self.cap_version >= 302:
                self.caps.add("cap-notify")  # implied by 302
            offered = " ".join(c + "=PLAIN" if c == "sasl" and self.cap_version >= 302 else c for c in CAPS)
            return [Line("CAP", (self.me, "LS", offered), self.server)]
        if sub == "LIST":
            return [Line("CAP", (self.me, "LIST", " ".join(sorted(self.caps))), self.server)]
        if sub == "REQ":
            self.negotiating = not self.registered
            wanted = line.params[1] if len(line.params) > 1 else ""
            names = wanted.split()
            adds = [c for c in names if not c.startswith("-")]
            drops = [c[1:] for c in names if c.startswith("-")]
            if not names or any(c not in CAPS for c in adds + drops) or "cap-notify" in drops and self.cap_version >= 302:
                return [Line("CAP", (self.me, "NAK", wanted), self.server)]
            self.caps.update(adds)
            self.caps.difference_update(drops)
            return [Line("CAP", (self.me, "ACK", wanted), self.server)]
        if sub == "END":
            if self.registered:
                return []
            self.negotiating = False
            return self._try_register()
        return [self.reply("410", line.params[0][:32], "Invalid CAP command")]

    # ------------------------------------------------------------ registration

    def _pre_pass(self, line: Line) -> list[Out]:
        if self.registered or self.account:
            return [self.reply(n.ERR_ALREADYREGISTRED, "You may not reregister")]
        if (err := self._need(line, 1)) is not None:
            return [err]
        self.password = line.params[0]
        return []

    def _pre_nick(self, line: Line) -> list[Out]:
        if not line.params or not line.params[0]:
            return [self.reply(n.ERR_NONICKNAMEGIVEN, "No nickname given")]
        nick = line.params[0]
        name = nick_to_name(nick)
        if self.registered:
            if name == self.account:
                return []
            return [self.reply(n.ERR_NONICKCHANGE, nick[:64], "Your nick is your zchat name: it cannot change here")]
        if name is None:
            return [self.reply(n.ERR_ERRONEUSNICKNAME, nick[:64], "Erroneous nickname: use a-z, 0-9, '_', '-' (1-32, starting with a letter or digit)")]
        if self.account and name != self.account:
            return [self.reply(n.ERR_NONICKCHANGE, nick, f"You are signed in as {self.account}")]
        self.nick = nick
        return self._try_register()

    def _pre_user(self, line: Line) -> list[Out]:
        if self.registered:
            return [self.reply(n.ERR_ALREADYREGISTRED, "You may not reregister")]
        if (err := self._need(line, 4)) is not None:
            return [err]
        self.user = line.params[0]
        return self._try_register()

    def _pre_authenticate(self, line: Line) -> list[Out]:
        if (err := self._need(line, 1)) is not None:
            return [err]
        arg = line.params[0]
        if self.account or self.registered:
            return [self.reply(n.ERR_SASLALREADY, "You have already authenticated")]
        if "sasl" not in self.caps or self.signing_in:
            return [self.reply(n.ERR_SASLFAIL, "SASL authentication failed")]
        if arg == "*":
            self.sasl = None
            return [self.reply(n.ERR_SASLABORTED, "SASL authentication aborted")]
        if self.sasl is None:
            if arg.upper() != "PLAIN":
                return [self.reply(n.RPL_SASLMECHS, "PLAIN", "are available SASL mechanisms"), self.reply(n.ERR_SASLFAIL, "SASL authentication failed")]
            self.sasl = ""
            return [Line("AUTHENTICATE", ("+",), self.server)]
        if arg != "+":
            self.sasl += arg
        if len(self.sasl) > MAX_SASL:
            self.sasl = None
            return [self.reply(n.ERR_SASLTOOLONG, "SASL message too long")]
        if len(arg) == 400:
            return []  # more chunks follow
        payload, self.sasl = self.sasl, None
        try:
            authzid, authcid, password = base64.b64decode(payload, validate=True).decode("utf-8").split("\0")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return [self.reply(n.ERR_SASLFAIL, "SASL authentication failed: not a PLAIN response")]
        name = nick_to_name(authcid)
        if name is None or (authzid and nick_to_name(authzid) != name):
            return [self.reply(n.ERR_SASLFAIL, "SASL authentication failed: not a zchat name")]
        self.signing_in, self.via = True, "sasl"
        return [SignIn(name, password, "sasl")]

    def signed_in(self, name: str, error: str = "", taken: bool = False) -> list[Out]:
        """The gateway's answer to SignIn: ``error`` empty means it worked. Over SASL a
        failure is 904 and the client may try again or go on; over PASS (or the nick
        alone) it is 433 for a taken name, 464 for a wrong password, then the end."""
        via, self.via = self.via, ""
        self.signing_in = False
        if error and via == "sasl":
            return [self.reply(n.ERR_SASLFAIL, f"SASL authentication failed: {error}")]
        if error:
            self.closed = True
            first = self.reply(n.ERR_NICKNAMEINUSE, name, error) if taken else self.reply(n.ERR_PASSWDMISMATCH, error)
            return [first, Quit("", error=f"Closing link: {error}")]
        self.account = name
        out: list[Out] = []
        if via == "sasl":
            mask = f"{self.nick or name}!{name}@zchat"
            out += [self.reply(n.RPL_LOGGEDIN, mask, name, f"You are now logged in as {name}"), self.reply(n.RPL_SASLSUCCESS, "SASL authentication successful")]
        return out + self._try_register()

    def _try_register(self) -> list[Out]:
        if self.registered or self.closed or not self.nick or not self.user or self.negotiating or self.signing_in:
            return []
        name = nick_to_name(self.nick)
        assert name is not None
        if not self.account:
            if self.password:
                self.signing_in, self.via = True, "pass"
                return [SignIn(name, self.password, "pass")]
            if not self.accounts:
                self.signing_in, self.via = True, "none"
                return [SignIn(name, "", "none")]
            self.closed = True
            text = "Password required: sign in with SASL PLAIN or PASS (the account of zchat web)"
            return [self.reply(n.ERR_PASSWDMISMATCH, text), Quit("", error=f"Closing link: {text}")]
        out: list[Out] = []
        if self.nick != self.account:
            out.append(Line("NICK", (self.account,), self.hostmask))
        self.nick = self.account
        self.registered = True
        return out + self._welcome() + [Ready()]

    def _welcome(self) -> list[Line]:
        me = self.nick
        isupport = [
            f"NETWORK={self.network}", "CASEMAPPING=ascii", "CHANTYPES=#", "PREFIX=", "CHANMODES=,,,nt",
            "NICKLEN=32", "CHANNELLEN=65", "UTF8ONLY", f"CHATHISTORY={MAX_CHATHISTORY}", "MSGREFTYPES=msgid",
            "TARGMAX=" + ",".join(f"{k}:{v}" for k, v in MAX_TARGETS.items()),
        ]
        return [
            self.reply(n.RPL_WELCOME, f"Welcome to {self.network} through its IRC gateway, {me}"),
            self.reply(n.RPL_YOURHOST, f"Your host is {self.server}, running zchat irc"),
            self.reply(n.RPL_CREATED, "This server is a gateway to a zchat broker"),
            self.reply(n.RPL_MYINFO, self.server, "zchat-irc", "i", "nt"),
            self.reply(n.RPL_ISUPPORT, *isupport, "are supported by this server"),
            self.reply(n.RPL_MOTDSTART, f"- {self.server} Message of the day -"),
            self.reply(n.RPL_MOTD, "- Channels are zchat rooms (#general); /msg NICK is a direct message."),
            self.reply(n.RPL_ENDOFMOTD, "End of /MOTD command"),
        ]

    # ------------------------------------------------------------ after registration

    def _rooms(self, line: Line, spec: str) -> tuple[list[str], list[Line]]:
        """The rooms of a comma list of channels, and the numerics for the bad ones."""
        rooms: list[str] = []
        errors: list[Line] = []
        targets = [t for t in spec.split(",") if t][: MAX_TARGETS.get(line.command, 1)]
        for channel in targets:
            room = channel_to_room(channel)
            if room is not None:
                rooms.append(room)
            elif channel.startswith("#"):
                errors.append(self.reply(n.ERR_BADCHANNAME, channel[:80], "Illegal channel name: use # then a-z, 0-9, '_', '-', '.' (1-64)"))
            else:
                errors.append(self.reply(n.ERR_NOSUCHCHANNEL, channel[:80], "No such channel: channels start with #"))
        return rooms, errors

    def _cmd_join(self, line: Line) -> list[Out]:
        if (err := self._need(line, 1)) is not None:
            return [err]
        if line.params[0] == "0":
            return [PartAll()]
        rooms, errors = self._rooms(line, line.params[0])
        return [*errors, *(Join(room) for room in rooms)]

    def _cmd_part(self, line: Line) -> list[Out]:
        if (err := self._need(line, 1)) is not None:
            return [err]
        rooms, errors = self._rooms(line, line.params[0])
        reason = line.params[1] if len(line.params) > 1 else ""
        return [*errors, *(Part(room, reason) for room in rooms)]

    def _cmd_privmsg(self, line: Line, notice: bool = False) -> list[Out]:
        if not line.params or not line.params[0]:
            return [] if notice else [self.reply(n.ERR_NORECIPIENT, f"No recipient given ({line.command})")]
        if len(line.params) < 2 or not line.params[1]:
            return [] if notice else [self.reply(n.ERR_NOTEXTTOSEND, "No text to send")]
        text, me = line.params[1], False
        if text.startswith("\x01"):
            ctcp = text.strip("\x01")
            verb, _, rest = ctcp.partition(" ")
            if verb.upper() != "ACTION" or not rest.strip():
                return []  # other CTCP (VERSION, PING, DCC) has no zchat form
            text, me = rest, True
        if not text.strip():
            return [] if notice else [self.reply(n.ERR_NOTEXTTOSEND, "No text to send")]
        out: list[Out] = []
        for target in [t for t in line.params[0].split(",") if t][: MAX_TARGETS["PRIVMSG"]]:
            if is_channel(target):
                rooms, errors = self._rooms(line, target)
                out += [] if notice else errors
                out += [Say(target, text, room=room, me=me, notice=notice) for room in rooms]
            elif (name := nick_to_name(target)) is not None:
                out.append(Say(target, text, to=name, me=me, notice=notice))
            elif not notice:
                out.append(self.reply(n.ERR_NOSUCHNICK, target[:64], "No such nick: zchat names are a-z, 0-9, '_', '-'"))
        return out

    def _cmd_notice(self, line: Line) -> list[Out]:
        return self._cmd_privmsg(line, notice=True)

    def _cmd_names(self, line: Line) -> list[Out]:
        if not line.params:
            return [self.reply(n.ERR_NEEDMOREPARAMS, "NAMES", "Give a channel: NAMES #room")]
        rooms, errors = self._rooms(line, line.params[0])
        return [*errors, *(Names(room) for room in rooms)]

    def _cmd_who(self, line: Line) -> list[Out]:
        mask = line.params[0] if line.params else "*"
        room = channel_to_room(mask)
        if room is None:
            return [self.reply(n.RPL_ENDOFWHO, mask[:64], "End of WHO list")]
        return [Who(room, mask)]

    def _cmd_whois(self, line: Line) -> list[Out]:
        if (err := self._need(line, 1)) is not None:
            return [err]
        nick = line.params[-1]
        name = nick_to_name(nick)
        if name is None:
            return [self.reply(n.ERR_NOSUCHNICK, nick[:64], "No such nick"), self.reply(n.RPL_ENDOFWHOIS, nick[:64], "End of WHOIS list")]
        return [
            self.reply(n.RPL_WHOISUSER, name, name, "zchat", "*", name),
            self.reply(n.RPL_WHOISSERVER, name, self.server, "zchat"),
            self.reply(n.RPL_ENDOFWHOIS, name, "End of WHOIS list"),
        ]

    def _cmd_list(self, line: Line) -> list[Out]:
        return [ListRooms()]

    def _cmd_topic(self, line: Line) -> list[Out]:
        if (err := self._need(line, 1)) is not None:
            return [err]
        _, errors = self._rooms(line, line.params[0])
        if errors:
            return list(errors)
        if len(line.params) > 1:
            return [self.reply(n.ERR_CHANOPRIVSNEEDED, line.params[0], "zchat rooms have no topic to set")]
        return [self.reply(n.RPL_NOTOPIC, line.params[0], "No topic is set")]

    def _cmd_mode(self, line: Line) -> list[Out]:
        if (err := self._need(line, 1)) is not None:
            return [err]
        target = line.params[0]
        if is_channel(target):
            _, errors = self._rooms(line, target)
            if errors:
                return list(errors)
            if len(line.params) > 1 and line.params[1] not in ("b", "+b"):
                return [self.reply(n.ERR_CHANOPRIVSNEEDED, target, "zchat rooms have no modes to set")]
            if len(line.params) > 1:
                return [self.reply("368", target, "End of channel ban list")]
            return [self.reply(n.RPL_CHANNELMODEIS, target, "+nt")]
        if nick_to_name(target) != self.account:
            return [self.reply("502", "Cannot change mode for other users")]
        if len(line.params) > 1:
            return [self.reply(n.ERR_UMODEUNKNOWNFLAG, "Unknown MODE flag")]
        return [self.reply(n.RPL_UMODEIS, "+i")]

    def _cmd_away(self, line: Line) -> list[Out]:
        if line.params and line.params[0]:
            return [self.reply(n.RPL_NOWAWAY, "You have been marked as being away (on this connection only)")]
        return [self.reply(n.RPL_UNAWAY, "You are no longer marked as being away")]

    def _cmd_pong(self, line: Line) -> list[Out]:
        return []

    def _cmd_ison(self, line: Line) -> list[Out]:
        return [self.reply("303", "")]

    def _cmd_userhost(self, line: Line) -> list[Out]:
        nicks = [nk for nk in line.params[:5] if nick_to_name(nk)]
        return [self.reply("302", " ".join(f"{nick_to_name(nk)}=+{nick_to_name(nk)}@zchat" for nk in nicks))]

    def _cmd_chathistory(self, line: Line) -> list[Out]:
        """LATEST, BEFORE and AFTER with msgid references (a msgid starts with the
        line's seq, see translate.msgid); timestamps and the other subcommands have
        no zchat form (history is by sequence number)."""
        def bad(code: str, text: str) -> list[Out]:
            return [self.fail("CHATHISTORY", code, text)]

        if len(line.params) < 4:
            return bad("NEED_MORE_PARAMS", "CHATHISTORY needs a subcommand, a target, a reference and a limit")
        sub, target, ref, count = line.params[0].upper(), line.params[1], line.params[2], line.params[-1]
        if sub not in ("LATEST", "BEFORE", "AFTER"):
            return bad("INVALID_PARAMS", f"{sub[:16]}: only LATEST, BEFORE and AFTER are supported")
        if not count.isdigit() or not 0 < int(count) <= 10_000:
            return bad("INVALID_PARAMS", "the limit must be a positive number")
        seq = 0
        if not (sub == "LATEST" and ref == "*"):
            seq = msgid_seq(ref[6:]) if ref.startswith("msgid=") else None
            if not seq:
                return bad("INVALID_MSGREFTYPE", "use msgid= references (timestamps have no zchat form)")
        if is_channel(target):
            room = channel_to_room(target)
        else:
            name = nick_to_name(target)
            room = dm_room(self.account, name) if name else None
        if room is None:
            return bad("INVALID_TARGET", f"{target[:64]} is not a channel or a nick")
        limit = min(int(count), MAX_CHATHISTORY)
        if sub == "BEFORE":
            return [History(target, room, limit, before=seq)]
        if sub == "AFTER":
            return [History(target, room, limit, after=seq, newest=False)]
        return [History(target, room, limit, after=seq)]


def msgid_seq(msgid: str) -> int | None:
    """The seq a msgid of ours starts with (``SEQ.ID``), or None."""
    head = msgid.partition(".")[0]
    return int(head) if head.isdigit() and len(head) < 19 else None
