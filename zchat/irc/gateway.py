"""One IRC connection over asyncio: its Session, its zchat Client, and the
translation between them.

The read loop feeds bytes to the Splitter and lines to the Session, and runs the
actions it returns on the Client one at a time (a JOIN is answered before the next
line is read: ordering for free, and backpressure). zchat events come from the
Client's listener (``Client.listen``) and are written at once. Every buffer is
bounded: the splitter by one line, unacked lines by MAX_UNACKED (reading waits),
the socket's output by MAX_SENDQ (past it the client is disconnected, as IRC
servers do with "SendQ exceeded").
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import secrets
import time
from typing import TYPE_CHECKING

from zchat import protocol as p
from zchat.client import (
    AuthError,
    Client,
    ClientError,
    Gap,
    Problem,
    Recovered,
    StateChange,
)
from zchat.irc import numerics as n
from zchat.irc import session as s
from zchat.irc.lines import Line, LineError, Splitter, format_line, parse
from zchat.irc.names import room_to_channel
from zchat.irc.signin import Refused
from zchat.irc.translate import (
    chat_lines,
    hostmask,
    msgid,
    names_lines,
    server_time,
    tags_for,
)

if TYPE_CHECKING:
    from zchat.irc.server import Gateway

log = logging.getLogger(__name__)

#: Bytes of output a connection may have unsent before it is dropped.
MAX_SENDQ = 2 * 1024 * 1024
#: Lines sent to zchat and not yet acknowledged; past this, reading waits.
MAX_UNACKED = 64
#: Seconds of silence before a PING, and after it before the connection is dropped.
PING_AFTER = 60.0
#: Bytes of zchat events (text + 128 each) held between sign-in and the end of
#: registration (SASL signs in during CAP; DMs only: no channel is joined yet).
MAX_EARLY_BYTES = 1024 * 1024
#: Seconds a new connection has to register.
REGISTER_WITHIN = 60.0
#: Members a channel's nick list keeps (for JOIN/PART/QUIT); NAMES asks the broker.
MAX_VISIBLE = 10_000
#: Seconds between rate-limit NOTICEs on one connection (the rest are counted in the next).
NOTICE_EVERY = 1.0
READ_CHUNK = 4096
#: Seconds after which a line from history carries its time in its text (no server-time).
DATED_AFTER = 60.0
#: Rows a LIST answers at most (a NOTICE says how many were left out): within MAX_SENDQ.
MAX_LIST = 5000

#: Commands whose parameters are never logged (passwords).
_SECRET = frozenset({"PASS", "AUTHENTICATE"})

_SAY_ERRORS = {
    p.ErrorCode.NOT_MEMBER: n.ERR_CANNOTSENDTOCHAN,
    p.ErrorCode.UNKNOWN_ROOM: n.ERR_NOSUCHCHANNEL,
    p.ErrorCode.BAD_ROOM: n.ERR_NOSUCHCHANNEL,
    p.ErrorCode.UNKNOWN_USER: n.ERR_NOSUCHNICK,
    p.ErrorCode.BAD_NAME: n.ERR_NOSUCHNICK,
}


@dataclasses.dataclass
class Channel:
    """A joined channel: the nicks its IRC client has been shown as present."""

    room: str
    visible: set[str] = dataclasses.field(default_factory=set)


class Connection:
    """One IRC client of the gateway (see the module docstring)."""

    def __init__(self, gateway: Gateway, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.gateway = gateway
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.address = peer[0] if isinstance(peer, tuple) else str(peer)
        self.session = s.Session(server=gateway.server_name, accounts=gateway.gatekeeper.accounts is not None, network=gateway.network)
        self.splitter = Splitter()
        self.client: Client | None = None
        self.channels: dict[str, Channel] = {}
        self.unacked: collections.deque[asyncio.Future] = collections.deque()
        self.ready = False
        self.early: list = []  # zchat events before registration ends (MAX_EARLY_BYTES)
        self.early_bytes = 0
        self.lost = False  # told the user the broker is gone
        self.closing = False
        self.last_heard = time.monotonic()
        self.recent: collections.deque[str] = collections.deque(maxlen=4 * MAX_UNACKED)  # cids of lines acked lately
        self.away: set[str] = set()  # nicks shown as AWAY (away-notify), at most MAX_VISIBLE
        self._limited = 0  # rate-limited lines not yet told about
        self._limited_told = 0.0
        self._limited_due = False  # a NOTICE for them is scheduled
        self._limited_wait = 0.0
        self._limited_where = ""

    # ------------------------------------------------------------ output

    def send(self, *lines: Line) -> None:
        if self.closing:
            return
        for line in lines:
            self.writer.write(format_line(line))
        if self.writer.transport.get_write_buffer_size() > MAX_SENDQ:
            log.info("%s: output queue over %d bytes: disconnecting", self.address, MAX_SENDQ)
            self.writer.transport.abort()
            self.closing = True

    def notice(self, text: str, target: str = "") -> None:
        self.send(Line("NOTICE", (target or self.session.me, text), self.session.server))

    @property
    def caps(self) -> set[str]:
        return self.session.caps

    @property
    def me(self) -> str:
        return self.session.me

    # ------------------------------------------------------------ life

    async def run(self) -> None:
        watchdog = asyncio.ensure_future(self._watchdog())
        try:
            while not self.closing:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                self.last_heard = time.monotonic()
                for item in self.splitter.feed(data):
                    if isinstance(item, LineError):
                        await self._do(self.session.bad_line(item))
                        continue
                    try:
                        line = parse(item)
                    except LineError as err:
                        await self._do(self.session.bad_line(err))
                        continue
                    log.debug("%s: %s %s", self.address, line.command, "" if line.command in _SECRET else line.params[:1])
                    await self._do(self.session.receive(line))
                    if self.closing:
                        break
                await self.writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            watchdog.cancel()
            await self.close()

    async def _watchdog(self) -> None:
        """PING a quiet client, drop a silent one, and one that never registers."""
        started = time.monotonic()
        pinged = False
        while not self.closing:
            await asyncio.sleep(min(5.0, PING_AFTER / 4))
            now = time.monotonic()
            if not self.session.registered and now - started > REGISTER_WITHIN:
                await self.quit("Registration timeout")
                return
            quiet = now - self.last_heard
            if quiet > 2 * PING_AFTER:
                await self.quit("Ping timeout")
                return
            if quiet > PING_AFTER and not pinged:
                self.send(Line("PING", (self.gateway.server_name,)))
                pinged = True
            elif quiet < PING_AFTER:
                pinged = False

    async def quit(self, error: str) -> None:
        self.send(Line("ERROR", (error,)))
        self.closing = True
        self.writer.close()

    async def close(self) -> None:
        self.closing = True
        client, self.client = self.client, None
        if client is not None:
            self.gateway.keep_cursors(client.name, client.cursors())
            await client.close()
        if not self.writer.is_closing():
            self.writer.close()

    # ------------------------------------------------------------ actions

    async def _do(self, outs: list[s.Out]) -> None:
        for out in outs:
            if isinstance(out, Line):
                self.send(out)
                continue
            handler = getattr(self, "_on_" + type(out).__name__.lower())
            await handler(out)

    async def _on_quit(self, action: s.Quit) -> None:
        await self.quit(action.error or "Closing link")

    async def _on_signin(self, action: s.SignIn) -> None:
        keeper = self.gateway.gatekeeper
        try:
            secret, made = await keeper.secret(action.name, action.password, self.address)
        except Refused as exc:
            await self._do(self.session.signed_in(action.name, str(exc)))
            return
        client = Client(self.gateway.broker, action.name, secret, cursors=self.gateway.cursors_of(action.name), label="zchat-irc")
        try:
            await client.connect()
        except ClientError as exc:
            if made:  # the name was never ours: the account made for it goes too
                keeper.forget(action.name)
            if isinstance(exc, AuthError):
                await self._do(self.session.signed_in(action.name, f"the name {action.name} is taken on this zchat broker", taken=True))
            else:
                await self._do(self.session.signed_in(action.name, f"the zchat broker refused: {exc.message}"))
            return
        self.client = client
        client.listen(self._on_events)  # before Ready, events wait in self.early (bounded)
        log.info("%s signed in as %s (%s)", self.address, action.name, action.via)
        await self._do(self.session.signed_in(action.name))

    async def _on_ready(self, action: s.Ready) -> None:
        assert self.client is not None and self.client.welcome is not None
        self.ready = True
        early, self.early = self.early, []
        self._on_events(early)
        for room in sorted(self.client.welcome.rooms):  # rooms the user is a member of
            if not p.is_dm_room(room):
                await self._on_join(s.Join(room))

    async def _on_join(self, action: s.Join) -> None:
        assert self.client is not None
        channel = room_to_channel(action.room)
        if action.room in self.channels:
            return
        try:
            members = await self.client.join(action.room, history=self.gateway.history)
        except ClientError as exc:
            code = n.ERR_BADCHANNAME if exc.code == p.ErrorCode.BAD_ROOM else "405" if exc.code == p.ErrorCode.LIMIT_REACHED else "473"
            self.send(self.session.reply(code, channel, f"Cannot join {channel}: {exc.message}"))
            return
        except TimeoutError:
            self.send(self.session.reply("473", channel, f"Cannot join {channel}: the zchat broker did not answer"))
            return
        chan = self.channels[action.room] = Channel(action.room)
        shown = [m.name for m in members if m.online or "away-notify" in self.caps or m.name == self.me]
        chan.visible.update(shown[:MAX_VISIBLE])
        if self.me not in shown:
            shown.append(self.me)
        self.send(Line("JOIN", (channel,), hostmask(self.me)))
        self.send(*names_lines(self.session.server, self.me, channel, shown))
        if "away-notify" in self.caps:
            for m in members:
                if not m.online and m.name != self.me and m.name not in self.away and len(self.away) < MAX_VISIBLE:
                    self.away.add(m.name)
                    self.send(Line("AWAY", ("offline",), hostmask(m.name)))

    async def _on_part(self, action: s.Part) -> None:
        assert self.client is not None
        channel = room_to_channel(action.room)
        if action.room not in self.channels:
            self.send(self.session.reply(n.ERR_NOTONCHANNEL, channel, "You're not on that channel"))
            return
        try:
            await self.client.part(action.room)
        except (TimeoutError, ClientError) as exc:
            self.notice(f"could not leave {channel}: {getattr(exc, 'message', 'no answer')}")
            return
        del self.channels[action.room]
        self.send(Line("PART", (channel, action.reason) if action.reason else (channel,), hostmask(self.me)))

    async def _on_partall(self, action: s.PartAll) -> None:
        for room in list(self.channels):
            await self._on_part(s.Part(room))

    async def _on_say(self, action: s.Say) -> None:
        assert self.client is not None
        if action.room and action.room not in self.channels:
            if not action.notice:
                self.send(self.session.reply(n.ERR_CANNOTSENDTOCHAN, action.target, "Cannot send to channel: join it first"))
            return
        try:
            fut = self.client.post(action.room, action.text, me=action.me) if action.room else self.client.post_dm(action.to, action.text, me=action.me)
        except ClientError as exc:
            self.notice(f"not sent: {exc.message}")
            return
        fut.add_done_callback(lambda f, a=action: self._said(f, a))
        self.unacked.append(fut)
        if len(self.unacked) >= MAX_UNACKED:
            for done in [f for f in self.unacked if f.done() and not f.cancelled() and f.exception() is None]:
                self.recent.append(done.result().cid)  # _mine still knows them
            self.unacked = collections.deque(f for f in self.unacked if not f.done())
            if len(self.unacked) >= MAX_UNACKED:  # wait for the broker before reading on
                await asyncio.wait(list(self.unacked), timeout=30, return_when=asyncio.FIRST_COMPLETED)

    def _said(self, fut: asyncio.Future, action: s.Say) -> None:
        """A line's ack or refusal: refusals become numerics or (rate limits) NOTICEs."""
        if fut.cancelled():
            return
        if fut.exception() is None:
            self.recent.append(fut.result().cid)
            return
        if action.notice or self.closing:
            return
        exc = fut.exception()
        code = getattr(exc, "code", "")
        if code == p.ErrorCode.RATE_LIMITED:
            self._limited += 1
            self._limited_wait = getattr(exc, "retry_after", 0.0)
            self._limited_where = action.target if action.room else ""
            wait = NOTICE_EVERY - (time.monotonic() - self._limited_told)
            if wait <= 0:
                self._tell_limited()
            elif not self._limited_due:  # the rest of this second's count comes then
                self._limited_due = True
                asyncio.get_running_loop().call_later(wait, self._tell_limited)
            return
        numeric = _SAY_ERRORS.get(code)
        message = getattr(exc, "message", str(exc))
        if numeric is not None:
            self.send(self.session.reply(numeric, action.target, message))
        else:
            self.notice(f"not sent to {action.target}: {message}")

    def _tell_limited(self) -> None:
        """One NOTICE for the lines refused as too fast since the last one."""
        self._limited_due = False
        if not self._limited or self.closing:
            return
        count, self._limited, self._limited_told = self._limited, 0, time.monotonic()
        self.notice(f"you are sending too fast: {count} line(s) not sent; wait {self._limited_wait:.1f}s", self._limited_where)

    async def _on_names(self, action: s.Names) -> None:
        assert self.client is not None
        channel = room_to_channel(action.room)
        try:
            members = await self.client.who(action.room)
        except (TimeoutError, ClientError):
            members = []
        shown = [m.name for m in members if m.online or "away-notify" in self.caps]
        self.send(*names_lines(self.session.server, self.me, channel, shown))

    async def _on_who(self, action: s.Who) -> None:
        assert self.client is not None
        server = self.session.server
        try:
            members = await self.client.who(action.room)
        except (TimeoutError, ClientError):
            members = []
        channel = room_to_channel(action.room)
        for m in members:
            self.send(Line(n.RPL_WHOREPLY, (self.me, channel, m.name, "zchat", server, m.name, "H" if m.online else "G", f"0 {m.name}"), server))
        self.send(self.session.reply(n.RPL_ENDOFWHO, action.mask, "End of WHO list"))

    async def _on_listrooms(self, action: s.ListRooms) -> None:
        assert self.client is not None
        try:
            rooms = await self.client.rooms()
        except (TimeoutError, ClientError):
            rooms = []
        self.send(self.session.reply(n.RPL_LISTSTART, "Channel", "Users  Name"))
        for room in rooms[:MAX_LIST]:
            self.send(self.session.reply(n.RPL_LIST, room_to_channel(room.name), str(room.members), f"{room.online} online"))
        if len(rooms) > MAX_LIST:
            self.notice(f"LIST shows the first {MAX_LIST} of {len(rooms)} rooms (by name)")
        self.send(self.session.reply(n.RPL_LISTEND, "End of /LIST"))

    async def _on_history(self, action: s.History) -> None:
        """CHATHISTORY: the lines in a chathistory batch (text and actions only)."""
        assert self.client is not None
        try:
            if action.newest:
                msgs = await self.client.history(action.room, limit=action.limit, before=action.before)
                msgs = [m for m in msgs if m.seq > action.after]
            else:
                msgs = await self.client.history(action.room, limit=action.limit, after=action.after)
        except (TimeoutError, ClientError) as exc:
            self.send(self.session.fail("CHATHISTORY", "INVALID_TARGET", f"{action.target}: {getattr(exc, 'message', 'no answer')}"))
            return
        tag = secrets.token_hex(4)
        self.send(Line("BATCH", ("+" + tag, "chathistory", action.target), self.session.server))
        for msg in msgs:
            if msg.kind in ("text", "me"):
                self._chat(msg, tag, "" if p.is_dm_room(msg.room) else action.target, dated=True)
        self.send(Line("BATCH", ("-" + tag,), self.session.server))

    def _chat(self, msg: p.Msg, batch: str, channel: str, dated: bool) -> None:
        """A text or /me line to ``channel`` (or, for "", the DM's other side). A line
        from the past (``dated``: history, catch-up) older than DATED_AFTER carries its
        time in its text for a client without server-time, which shows it as said now."""
        tags = tags_for(self.caps, msg.ts, msgid(msg.seq, msg.id), batch)
        text = msg.text
        if dated and "server-time" not in self.caps and time.time() - msg.ts > DATED_AFTER:
            text = f"[{server_time(msg.ts)[:16].replace('T', ' ')}] {text}"
        if channel:
            target, source = channel, msg.sender
        elif msg.sender == self.me:
            target, source = msg.to, self.me
        else:
            target, source = self.me, msg.sender
        self.send(*chat_lines(hostmask(source), target, text, me=msg.kind == "me", tags=tags))

    # ------------------------------------------------------------ zchat events

    def _mine(self, msg: p.Msg) -> bool:
        """Posted from this connection (its ack has come, or the line itself on SUB:
        the library settles the future before handing the line out)."""
        for fut in self.unacked:
            if fut.done() and not fut.cancelled() and fut.exception() is None and fut.result().cid == msg.cid:
                return True
        return msg.cid in self.recent

    def _on_events(self, events: list) -> None:
        """The Client's listener: zchat events as IRC lines, in order. Until registration
        ends (SASL signs in during CAP) they wait in ``early``, at most MAX_EARLY_BYTES."""
        if self.closing:
            return
        if not self.ready:
            self.early += events
            self.early_bytes += sum(len(getattr(e, "text", "")) + 128 for e in events)
            if self.early_bytes > MAX_EARLY_BYTES:
                self.early.clear()
                asyncio.ensure_future(self.quit("Too much arrived before registration ended"))
            return
        replayed = {e.room for e in events if isinstance(e, Recovered)}
        batches: dict[str, str] = {}
        for event in events:
            if isinstance(event, p.Msg):
                batch = ""
                if event.room in replayed and "batch" in self.caps and not p.is_dm_room(event.room):
                    batch = batches.get(event.room, "")
                    if not batch and event.room in self.channels:
                        batch = batches[event.room] = secrets.token_hex(4)
                        self.send(Line("BATCH", ("+" + batch, "chathistory", room_to_channel(event.room)), self.session.server))
                self._on_msg(event, event.room in replayed, batch)
            elif isinstance(event, p.Presence):
                self._on_presence(event)
            elif isinstance(event, StateChange):
                if event.state == "reconnecting" and not self.lost:
                    self.lost = True
                    self.notice(f"lost the zchat broker ({event.detail}); reconnecting")
                elif event.state == "connected" and self.lost:
                    self.lost = False
                    self.notice("connected to the zchat broker again")
                elif event.state == "closed" and not self.closing:
                    asyncio.ensure_future(self.quit("the zchat connection closed"))
            elif isinstance(event, Gap):
                target = room_to_channel(event.room) if event.room in self.channels else ""
                self.notice(f"messages {event.first}-{event.last} could not be recovered: {event.reason}", target)
            elif isinstance(event, Problem):
                self.notice(event.message)
        for batch in batches.values():
            self.send(Line("BATCH", ("-" + batch,), self.session.server))

    def _on_msg(self, msg: p.Msg, replayed: bool, batch: str) -> None:
        own = msg.sender == self.me
        if p.is_dm_room(msg.room):
            if not own or "echo-message" in self.caps:  # our own DMs only as echoes
                self._chat(msg, batch, "", replayed)
            return
        chan = self.channels.get(msg.room)
        if chan is None:
            return
        channel = room_to_channel(msg.room)
        if msg.kind in ("text", "me"):
            if own and "echo-message" not in self.caps and self._mine(msg):
                return
            self._chat(msg, batch, channel, replayed)
            return
        if replayed or own:
            return  # joins and parts of the past are not replayed; ours we said already
        tags = tags_for(self.caps, msg.ts, msgid(msg.seq, msg.id))
        if msg.kind == "join" and msg.sender not in chan.visible:
            if len(chan.visible) < MAX_VISIBLE:
                chan.visible.add(msg.sender)
            self.send(Line("JOIN", (channel,), hostmask(msg.sender), tags))
        elif msg.kind == "part" and msg.sender in chan.visible:
            chan.visible.discard(msg.sender)
            self.send(Line("PART", (channel,), hostmask(msg.sender), tags))
        else:
            self._moderation(msg, channel, chan, tags)

    def _moderation(self, msg: p.Msg, channel: str, chan: Channel, tags: tuple[tuple[str, str], ...]) -> None:
        """Moderation and edits, the IRC way where IRC has a way: KICK (a kick or a ban
        takes the user out), TOPIC, MODE +o/-o; IRC cannot change a line already shown,
        so an edit or a delete is a NOTICE from its author naming the line."""
        source = hostmask(msg.sender)
        if msg.kind in ("kick", "ban"):
            chan.visible.discard(msg.to)
            reason = msg.text or ("banned" if msg.kind == "ban" else "kicked")
            self.send(Line("KICK", (channel, msg.to, reason), source, tags))
            if msg.to == self.me:
                self.channels.pop(msg.room, None)
        elif msg.kind == "topic":
            self.send(Line("TOPIC", (channel, msg.text), source, tags))
        elif msg.kind in ("op", "deop"):
            self.send(Line("MODE", (channel, "+o" if msg.kind == "op" else "-o", msg.to), source, tags))
        elif msg.kind == "edit":
            self.send(Line("NOTICE", (channel, f"(edited line {msg.ref}) {msg.text}"), source, tags))
        elif msg.kind == "delete":
            self.send(Line("NOTICE", (channel, f"(deleted line {msg.ref or msg.text})"), source, tags))

    def _on_presence(self, event: p.Presence) -> None:
        chan = self.channels.get(event.room)
        if chan is None or event.name == self.me:
            return
        tags = tags_for(self.caps, event.ts)
        source = hostmask(event.name)
        if "away-notify" in self.caps:
            if event.online and event.name in self.away:
                self.away.discard(event.name)
                self.send(Line("AWAY", (), source, tags))
            elif not event.online and event.name not in self.away and len(self.away) < MAX_VISIBLE:
                self.away.add(event.name)
                self.send(Line("AWAY", ("offline",), source, tags))
        elif event.online:
            if event.name not in chan.visible:
                if len(chan.visible) < MAX_VISIBLE:
                    chan.visible.add(event.name)
                self.send(Line("JOIN", (room_to_channel(event.room),), source, tags))
        elif any(event.name in c.visible for c in self.channels.values()):
            for c in self.channels.values():
                c.visible.discard(event.name)
            self.send(Line("QUIT", ("offline",), source, tags))
