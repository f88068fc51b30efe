"""One zchat Client per signed-in user, shared by all that user's tabs.

The gateway is a face: each browser user is a ``zchat.client.Client`` inside it, so
ordering, gap filling, dedup and resends are the library's. The hub only fans the
client's events out to tabs (encoded once for all the users a line reaches: see
``wire.Shared``), answers a reconnecting tab from history, and remembers the page's
ids (``ref``) of recent lines so that a line the page sends again after a reconnect is
not posted twice.

Bounds: ``max_users`` clients in a gateway, ``max_tabs`` tabs a user, each tab's queue
in bytes (zchat.web.tab), ``MAX_REFS`` remembered refs a user. A user with no tab left
keeps their client for ``idle_close`` seconds (a reload is not a sign-off), then it
closes and the user goes offline.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import zmq
import zmq.asyncio

from zchat import protocol as p
from zchat.accounts import Account
from zchat.client import Client, ClientError, Event, StateChange
from zchat.web import wire
from zchat.web.collector import Collector
from zchat.web.tab import (
    CLOSE_GONE,
    CLOSE_SIGNED_OUT,
    CLOSE_TOO_MANY,
    MAX_IN_FLIGHT,
    Tab,
)

#: Lines that change a room's members (the client keeps them): the heap grew.
_MEMBERSHIP = frozenset({"join", "part", "kick", "ban"})

log = logging.getLogger(__name__)

#: Rooms a new user is put in, so a first sign-in shows a chat, not an empty page.
DEFAULT_ROOMS = ("general",)
#: Messages a fresh tab gets per room; older ones come as the user scrolls up.
INITIAL = 50
#: Most missed messages of a room a reconnecting tab is sent; past that it gets the
#: newest INITIAL (``reset``) and scrolls up for the rest.
REPLAY_MAX = 1000
#: Messages a replay frame holds (history is asked a page at a time).
REPLAY_PAGE = 100
MAX_REFS = 4096
#: ZeroMQ sockets one user's Client may hold at once (a redial briefly has two DEALERs).
SOCKETS_PER_USER = 8


class GatewayFull(Exception):
    """The gateway serves ``max_users`` users already."""


class UserHub:
    """A signed-in user: their Client and their tabs."""

    def __init__(self, gateway: Gateway, client: Client) -> None:
        self.gateway = gateway
        self.client = client
        self.name = client.name
        self.tabs: set[Tab] = set()
        self._refs: collections.OrderedDict[str, asyncio.Future] = collections.OrderedDict()
        self._idle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self.closed = False

    async def start(self, default_rooms: tuple[str, ...] = DEFAULT_ROOMS) -> None:
        """Connect (raising AuthError when the name is refused) and join the user's rooms."""
        welcome = await self.client.connect()
        self.client.listen(self._on_events)
        rooms = [r for r in welcome.rooms if not p.is_dm_room(r)] or list(default_rooms)
        for room in rooms:
            try:
                await self.client.join(room)
            except ClientError as exc:
                log.warning("%s could not rejoin %s: %s", self.name, room, exc)
        self._arm_idle()

    # ------------------------------------------------------------ tabs

    def attach(self, tab: Tab, hello: wire.Hello) -> None:
        """Take a tab: welcome it, then send what it misses per room (from history)
        while live events flow to it. Live events delivered after this call have seqs
        above the cursors read here, history is asked up to them: exactly once each."""
        if len(self.tabs) >= self.gateway.max_tabs:
            tab.drop(CLOSE_TOO_MANY, f"at most {self.gateway.max_tabs} tabs a user")
            return
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        cursors = self.client.cursors()
        self.tabs.add(tab)
        tab.push(wire.frame(
            "welcome", name=self.name, state=self.client.state,
            rooms=[{"room": room, "epoch": epoch, "last": last} for room, (epoch, last) in sorted(cursors.items())],
        ))
        self._spawn(self._replay(tab, cursors, hello.since))

    async def _replay(self, tab: Tab, cursors: dict[str, tuple[str, int]], since: dict[str, tuple[str, int]]) -> None:
        for room, (epoch, last) in cursors.items():
            have = since.get(room)
            if last <= 0 or tab.closed:
                continue
            try:
                if have is not None and have[0] == epoch and have[1] <= last and last - have[1] <= REPLAY_MAX:
                    await self._catch_up(tab, room, epoch, have[1], last)
                else:
                    await self._newest(tab, room, epoch, last)
            except (TimeoutError, ClientError) as exc:
                tab.push(wire.frame("error", code=getattr(exc, "code", "timeout"), message=f"could not load {room}: {exc}"))

    async def _newest(self, tab: Tab | None, room: str, epoch: str, last: int) -> None:
        """The newest INITIAL messages up to ``last``, after a ``reset`` that tells the
        page to drop what it holds up to there; to ``tab``, or to every tab."""
        msgs = await self.client.history(room, limit=INITIAL, before=last + 1) if last > 0 else []
        texts = [wire.frame("reset", room=room, epoch=epoch, upto=last, more=len(msgs) >= INITIAL)]
        if msgs:
            texts += wire.frames("replay", [wire.msg(m) for m in msgs if m.seq <= last], wire.FRAME_LIMIT, room=room, epoch=epoch)
        for text in texts:
            if tab is None:
                self.broadcast(text)
            elif tab.push(text):
                await tab.drained()

    async def _catch_up(self, tab: Tab, room: str, epoch: str, after: int, last: int) -> None:
        """What the tab missed, after..last, a page at a time at the tab's pace."""
        while after < last and not tab.closed:
            msgs = await self.client.history(room, limit=min(REPLAY_PAGE, last - after), after=after)
            if not msgs:
                return
            for text in wire.frames("replay", [wire.msg(m) for m in msgs if m.seq <= last], wire.FRAME_LIMIT, room=room, epoch=epoch):
                if not tab.push(text):
                    return
                await tab.drained()
            after = msgs[-1].seq

    def detach(self, tab: Tab) -> None:
        self.tabs.discard(tab)
        self._arm_idle()

    def _arm_idle(self) -> None:
        if self.tabs or self.closed or self._idle is not None:
            return
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self.gateway.idle_close, lambda: self._spawn(self._close_if_idle()))

    async def _close_if_idle(self) -> None:
        """The idle timer ran out: close, unless a tab came meanwhile."""
        self._idle = None
        if not self.tabs and self.gateway.users.get(self.name) is self:
            await self.gateway.drop_user(self.name)

    def sign_out(self, session_key: str) -> None:
        """Close the tabs of one session (its cookie is no longer valid)."""
        for tab in [t for t in self.tabs if t.session_key == session_key]:
            tab.drop(CLOSE_SIGNED_OUT, "signed out")

    def broadcast(self, text: str) -> None:
        self._broadcast(text.encode())

    def _broadcast(self, data: bytes, whole: bytes | None = None) -> None:
        whole = whole or wire.framed(data)
        for tab in list(self.tabs):
            if not tab.send(data, whole):
                self.tabs.discard(tab)
        if not self.tabs:
            self._arm_idle()

    # ------------------------------------------------------------ from the client

    def _on_events(self, events: list[Event]) -> None:
        """Called by the client on the loop: the chunk's frames, encoded once for every
        user it reaches (``Gateway.shared``), go to every tab."""
        for ev in events:
            if isinstance(ev, p.Presence) or (isinstance(ev, p.Msg) and ev.kind in _MEMBERSHIP):
                self.gateway.collector.grew()  # members the client keeps: frozen once settled
            elif isinstance(ev, StateChange) and ev.state == "closed" and not self.closed:
                self._spawn(self.gateway.drop_user(self.name))
        if self.tabs:
            for data, whole in wire.events(self.gateway.shared, events):
                self._broadcast(data, whole)

    # ------------------------------------------------------------ from a tab

    async def handle(self, tab: Tab, req: wire.Incoming) -> None:
        """Carry out one request of a tab; errors go back to that tab as ``error``."""
        try:
            if isinstance(req, wire.Send):
                self._send(tab, req)
            elif isinstance(req, wire.Join):
                await self.join(req.room)
            elif isinstance(req, wire.Part):
                await self.client.part(req.room)
                self.broadcast(wire.frame("parted", room=req.room))
            elif isinstance(req, wire.Who):
                members = await self.client.who(req.room)
                tab.push(wire.frame("members", room=req.room, members=wire.members(members)))
            elif isinstance(req, wire.History):
                msgs = await self.client.history(req.room, limit=req.limit, before=req.before)
                more = len(msgs) >= req.limit
                for text in wire.frames("older", [wire.msg(m) for m in msgs], wire.FRAME_LIMIT, room=req.room, more=more):
                    if tab.push(text):
                        await tab.drained()
            elif isinstance(req, wire.Hello):
                tab.push(wire.frame("error", code="bad_frame", message="hello is the first frame only"))
        except ClientError as exc:
            tab.push(wire.frame("error", code=exc.code, message=exc.message, about=req.__struct_config__.tag))
        except TimeoutError:
            tab.push(wire.frame("error", code="timeout", message="the broker did not answer in time", about=req.__struct_config__.tag))

    def spawn_request(self, tab: Tab, req: wire.Incoming) -> None:
        """Handle a request that waits for the broker in a task of its own, counted in
        ``tab.requests`` (bounded by the caller)."""
        tab.requests += 1

        async def run() -> None:
            try:
                await self.handle(tab, req)
            finally:
                tab.requests -= 1

        self._spawn(run())

    async def join(self, room: str) -> None:
        """Join for all the user's tabs: each gets the members and the newest messages."""
        members = await self.client.join(room)
        epoch, last = self.client.cursors().get(room, (self.client.epoch, 0))
        self.broadcast(wire.frame("joined", room=room, members=wire.members(members)))
        await self._newest(None, room, epoch, last)

    def _send(self, tab: Tab, req: wire.Send) -> None:
        """Post a line once per ref (a ref seen before gets the first post's outcome) and
        tell the tab when the broker stored it."""
        fut = self._refs.get(req.ref)
        if fut is None:
            if tab.in_flight >= MAX_IN_FLIGHT:
                tab.push(wire.frame("failed", ref=req.ref, code="limit_reached", message=f"{MAX_IN_FLIGHT} lines are waiting for the broker already"))
                return
            if not req.text.strip():
                tab.push(wire.frame("failed", ref=req.ref, code="bad_request", message="empty line"))
                return
            try:
                if req.to:
                    fut = self.client.post_dm(req.to, req.text, me=req.me)
                else:
                    fut = self.client.post(req.room, req.text, me=req.me)
            except ClientError as exc:
                tab.push(wire.frame("failed", ref=req.ref, code=exc.code, message=exc.message))
                return
            self._refs[req.ref] = fut
            while len(self._refs) > MAX_REFS:
                self._refs.popitem(last=False)
        tab.in_flight += 1
        self._spawn(self._confirm(tab, req.ref, fut))

    async def _confirm(self, tab: Tab, ref: str, fut: asyncio.Future) -> None:
        try:
            stored: p.Stored = await asyncio.shield(fut)
        except ClientError as exc:
            tab.push(wire.frame("failed", ref=ref, code=exc.code, message=exc.message))
        else:
            tab.push(wire.frame("sent", ref=ref, room=stored.room, seq=stored.seq))
        finally:
            tab.in_flight -= 1

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close the user's tabs and client (the user goes offline)."""
        self.closed = True
        if self._idle is not None:
            self._idle.cancel()
        for tab in list(self.tabs):
            tab.drop(CLOSE_GONE, "your connection to the chat closed: reload to sign in again")
        self.tabs.clear()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await self.client.close()


class Gateway:
    """All users' hubs: at most ``max_users``, one per name, started on demand."""

    def __init__(
        self, broker: str, *, max_users: int = 1000, max_tabs: int = 8, idle_close: float = 60.0,
        trust_new_broker: bool = False, default_rooms: tuple[str, ...] = DEFAULT_ROOMS,
        collector: Collector | None = None,
    ) -> None:
        self.broker = broker
        self.max_users = max_users
        self.max_tabs = max_tabs
        self.idle_close = idle_close
        self.trust_new_broker = trust_new_broker
        self.default_rooms = default_rooms
        self.users: dict[str, UserHub] = {}
        self.shared = wire.Shared()  # live frames, encoded once for all the users they reach
        # the settled heap out of the cyclic GC's full scans (zchat.web.collector)
        self.collector = collector if collector is not None else Collector()
        self._starting: dict[str, asyncio.Lock] = {}
        # A Client has a few ZeroMQ sockets (DEALER, SUB, its monitor's pair); libzmq's
        # default of 1,023 sockets a context would stop the gateway near 250 users.
        # (Set before the first socket: libzmq reads it when the context starts.)
        ctx = zmq.asyncio.Context.instance()
        ctx.max_sockets = max(ctx.max_sockets, SOCKETS_PER_USER * max_users + 64)

    async def user(self, account: Account, invite: str = "") -> UserHub:
        """The hub of ``account``, connecting its client first if needed. Raises
        GatewayFull, or the client's AuthError/ConnectError/BrokerKeyError."""
        hub = self.users.get(account.name)
        if hub is not None and not hub.closed:
            return hub
        lock = self._starting.setdefault(account.name, asyncio.Lock())
        try:
            async with lock:
                hub = self.users.get(account.name)
                if hub is not None and not hub.closed:
                    return hub
                if len(self.users) >= self.max_users:
                    raise GatewayFull(f"this gateway serves {self.max_users} users, its most: try again later")
                client = Client(self.broker, account.name, account.secret, label="zchat-web", trust_new_broker=self.trust_new_broker, invite=invite)
                hub = UserHub(self, client)
                await hub.start(self.default_rooms)
                self.users[account.name] = hub
                self.collector.changed()
                log.info("%s signed in (%d users)", account.name, len(self.users))
                return hub
        finally:
            if not lock.locked() and self._starting.get(account.name) is lock:
                del self._starting[account.name]

    async def drop_user(self, name: str) -> None:
        hub = self.users.pop(name, None)
        if hub is not None:
            log.info("%s has no tab left: closing their client", name)
            await hub.close()
            self.collector.changed(left=True)

    async def close(self) -> None:
        for name in list(self.users):
            await self.drop_user(name)
        self.collector.stop()
