"""zchat.client: the one client library (the TUI, the CLI, the bots, the benchmark and
the tests all talk to the broker through it).

It hides what ZeroMQ's PUB/SUB does not promise: a late subscription, messages dropped
for a slow subscriber, a broker restart. Every room is tracked by sequence number
(zchat.recovery); a gap is filled from history, a duplicate is dropped, and what can
not be recovered is reported as a Gap event. Sends carry a client id (cid) and are
resent until the broker acks them; the broker drops the duplicates.

Two sockets per client: a DEALER for requests, chat lines, replies and acks, and a SUB
for fan-out. Each is served by one _Pump, from event-loop callbacks on the loop's
thread only; other coroutines hand it work through ``submit()``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import secrets
import time
from typing import AsyncIterator, Callable

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from zchat import protocol as p
from zchat.recovery import Gap, Tracker
from zchat.sockio import NOBLOCK, readable, recv_parts

log = logging.getLogger(__name__)

__all__ = ["Client", "ClientError", "AuthError", "ConnectError", "StateChange", "Recovered", "Gap", "Problem", "Event"]

#: A request refused with rate_limited is asked again after the broker's retry_after,
#: at most this many times and for at most this long in all: a short wait is a delay
#: for the caller, a long one an error it can show (with ``retry_after``).
RATE_RETRIES = 5
RATE_WAIT_MAX = 15.0
#: Most pages ``who()`` and ``rooms()`` follow (each is up to ~1 MiB).
MAX_LIST_PAGES = 200
#: Seconds between attempts to re-join rooms a restarted broker refused or did not answer.
REJOIN_RETRY = 5.0
#: Refusals worth trying again later (the others are final: the room is dropped).
_TRANSIENT = frozenset({p.ErrorCode.RATE_LIMITED, p.ErrorCode.INTERNAL, p.ErrorCode.NO_SESSION, p.ErrorCode.SHUTTING_DOWN, p.ErrorCode.STORAGE_UNAVAILABLE})
#: Send refusals that keep the line pending, resent after ack_timeout (nothing was stored).
_RESEND = frozenset({p.ErrorCode.INTERNAL, p.ErrorCode.STORAGE_UNAVAILABLE})


class ClientError(Exception):
    """The broker refused something; ``code`` is a protocol ErrorCode, ``retry_after``
    the seconds to wait first when it is rate_limited."""

    def __init__(self, code: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class AuthError(ClientError):
    """The handshake was refused: the name is taken (another secret owns it) or invalid."""


class ConnectError(ClientError):
    """The broker did not answer in time."""


class BrokerKeyError(ConnectError):
    """The broker's key is unknown (and may not be trusted on first use here) or is not
    the one pinned for it: nothing was sent to it. The message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class StateChange:
    """Connection state: ``connected``, ``reconnecting`` or ``closed``; ``since`` is time.time()."""

    state: str
    since: float
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Recovered:
    """``count`` messages of ``room`` came from history after a gap (not from live fan-out)."""

    room: str
    count: int


@dataclasses.dataclass(frozen=True)
class Problem:
    """The broker reported an error that names no request and no chat line (e.g. a frame
    it could not read at all), or a room could not be re-joined: shown, never dropped."""

    code: str
    message: str


Event = p.Msg | p.Presence | StateChange | Recovered | Gap | Problem


#: Requests a client has on the wire at once (the broker's ROUTER queues 16 replies a
#: connection by default; acks and errors share that queue).
MAX_IN_FLIGHT = 8

#: Unanswered pings in a row after which the client connects again as a new session.
REDIAL_AFTER = 3


class _Pump:
    """Owns one socket: runs queued operations on it and hands received frames on.

    Everything runs in event-loop callbacks on the loop's thread, never in parallel:
    the socket's ZMQ_FD readiness, ``submit()`` (scheduled with call_soon) and a
    one-second safety timer all call ``_service``. The FD is edge-triggered, so each
    pass reads until ZMQ_EVENTS says nothing is left (a send of ours can consume the
    edge). No task sits between a frame's arrival and its handler.
    """

    def __init__(self, sock: zmq.asyncio.Socket, on_recv: Callable[[list[bytes]], None] | None) -> None:
        self.sync = zmq.Socket.shadow(sock.underlying)
        self.on_recv = on_recv
        self.ops: collections.deque[Callable[[zmq.Socket], None]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._closed = False
        self._fd: int | None = None

    def submit(self, op: Callable[[zmq.Socket], None]) -> None:
        self.ops.append(op)
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._service)

    def send_now(self, data: bytes) -> bool:
        """Send at once if nothing queued must go first (order is kept); False if it
        cannot, and then the caller queues it. Runs on the loop's thread like the rest."""
        if self.ops or self._scheduled or self._loop is None or self._closed:
            return False  # (scheduled: a pass is due this turn, e.g. after an earlier send_now)
        try:
            self.sync.send(data, NOBLOCK)
        except zmq.Again:
            return False
        self._scheduled = True  # the send may have consumed the FD's edge: look again soon
        self._loop.call_soon(self._service)
        return True

    async def run(self) -> None:
        """Serve the socket until cancelled."""
        loop = self._loop = asyncio.get_running_loop()
        fd = self._fd = self.sync.getsockopt(zmq.FD) if self.on_recv is not None else None
        safety: asyncio.TimerHandle | None = None

        def recheck() -> None:  # one standing timer, not one per wait
            nonlocal safety
            self._service()
            safety = loop.call_later(1.0, recheck)

        if fd is not None:
            loop.add_reader(fd, self._service)
            safety = loop.call_later(1.0, recheck)
        self._service()  # whatever was submitted before the loop was known
        try:
            await loop.create_future()  # forever: the callbacks do the work
        finally:
            if safety is not None:
                safety.cancel()
            self.stop()

    def stop(self) -> None:
        """Stop serving the socket now (before it is closed): no callback touches it after."""
        if not self._closed:
            self._closed = True
            if self._fd is not None and self._loop is not None:
                self._loop.remove_reader(self._fd)

    def _service(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        ops = self.ops
        while ops:
            op = ops.popleft()
            try:
                op(self.sync)
            except zmq.Again:
                log.debug("socket full; the operation will be retried by its owner")
        if self.on_recv is not None and self._drain() and not self._scheduled:
            self._scheduled = True  # more is queued: carry on after others had a turn
            self._loop.call_soon(self._service)  # type: ignore[union-attr]

    def _drain(self) -> bool:
        """Read what is queued (a bounded amount); True if more is left."""
        sync, deliver = self.sync, self._deliver
        for _ in range(1000):
            if not readable(sync):
                return False
            try:
                frames = recv_parts(sync)
            except zmq.Again:
                return False
            deliver(frames)
        return True

    def _deliver(self, frames: list[bytes]) -> None:
        try:
            self.on_recv(frames)  # type: ignore[misc]
        except p.ProtocolError as exc:
            log.warning("ignored a malformed message from the broker: %s", exc)
        except Exception:  # a bug in a handler must not stop the socket being served
            log.exception("failed to handle a message from the broker")


class _Pending:
    __slots__ = ("data", "future", "sent")

    def __init__(self, data: bytes, future: asyncio.Future, sent: float) -> None:
        self.data = data
        self.future = future
        self.sent = sent


def split_broker(address: str) -> tuple[str, int]:
    base, _, port = address.rpartition(":")
    if not address.startswith("tcp://") or not port.isdigit() or not base[len("tcp://"):]:
        raise ValueError(f"broker address must look like tcp://HOST:PORT, got {address!r}")
    return base, int(port)


class Client:
    """A connection to one broker as one user.

    ``cursors`` (room -> (epoch, last seq seen)), as returned by ``cursors()`` at the end
    of an earlier run, lets a returning client receive what it missed, up to
    ``recover_limit`` messages a room (the rest is reported as a Gap). That bound is for
    coming back after being away only: while connected (pauses, a stalled reader, a
    broker restart) everything is fetched from history, page by page, however far behind.

    ``name`` protocol.LOOKER (see ``Client.looker``) is a look-only session.
    """

    def __init__(
        self,
        broker: str,
        name: str,
        secret: str | None = None,
        *,
        cursors: dict[str, tuple[str, int]] | None = None,
        recover_limit: int = 1000,
        ack_timeout: float = 3.0,
        label: str = "zchat",
        sub_hwm: int = 100_000,
        trust_new_broker: bool = False,
        invite: str = "",
    ) -> None:
        if name != p.LOOKER and not p.valid_name(name):
            raise ClientError(p.ErrorCode.BAD_NAME, f"bad name {name!r}: use a-z, 0-9, '_', '-' (1-{p.MAX_NAME_LEN} characters, lowercase)")
        from zchat import keys

        try:
            endpoint, _ = keys.split_address(broker)
        except ValueError as exc:
            raise ClientError(p.ErrorCode.BAD_REQUEST, str(exc)) from None
        self.base, _ = split_broker(endpoint)
        if secret is None:
            from zchat.config import load_secret

            secret = load_secret(name)
        self.address = broker  # as given, maybe with #k=KEY
        self.broker = endpoint  # what we connect to
        # ZCHAT_TRUST_NEW_BROKER=1 is --trust-new-broker for processes without the flag
        # (the compose demo's bots, on the compose network).
        self.trust_new_broker = trust_new_broker or os.environ.get("ZCHAT_TRUST_NEW_BROKER") == "1"
        self.invite = invite
        # CURVE unless a broker in this very process was started in its test-only plaintext mode.
        self.plaintext = keys.is_insecure(endpoint)
        self.server_key: str | None = None
        self.public_key, self._secret_key = keys.throwaway_keypair() if name == p.LOOKER else keys.keypair_from_secret(secret, name)
        self.name = name
        self.secret = secret
        self.label = label
        self.recover_limit = recover_limit
        self.ack_timeout = ack_timeout
        self.sub_hwm = sub_hwm
        self.sid = secrets.token_hex(8)
        self.state = "offline"
        self.state_since = time.time()
        self.welcome: p.Welcome | None = None
        self.epoch = ""
        self.boot = ""
        self.heartbeat = 10.0
        self.max_bytes = p.MAX_MESSAGE_BYTES
        self.recovered = 0  # messages filled from history over this client's life
        self._cursors = dict(cursors or {})
        self._given = set(self._cursors)  # rooms whose cursor is from an earlier run (unused yet)
        self._catch_up: set[str] = set()  # rooms whose first catch-up after being away is due
        self._trackers: dict[str, Tracker] = {}
        self._subscribed: set[str] = set()  # room topics the SUB socket holds (once each)
        self._rejoin: set[str] = set()  # rooms a restarted broker has not taken back yet
        self._rejoin_at = 0.0
        self._rejoining: asyncio.Future | None = None
        self._rid = 0
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)  # requests awaiting their reply
        self._waiting: dict[int, asyncio.Future] = {}
        self._pending: dict[str, _Pending] = {}
        self._outbox: list[bytes] = []  # encoded Sends waiting for the DEALER pump
        self._cid_base = secrets.token_hex(6) + "-"  # cids: random per client, then a counter
        self._cid_count = 0
        self._events: asyncio.Queue[list | None] = asyncio.Queue()  # lists of events, in order
        self._listener: Callable[[list[Event]], None] | None = None
        self._want_fill: set[str] = set()
        self._fill_wake = asyncio.Event()
        self._auth_failed: asyncio.Future | None = None
        self._tasks: list[asyncio.Task] = []
        self._ctx = zmq.asyncio.Context.instance()
        self._socks: list[zmq.asyncio.Socket] = []
        self._rehello_lock = asyncio.Lock()

    @classmethod
    def looker(cls, broker: str, **kwargs: object) -> "Client":
        """A look-only session: ping, who, rooms and public history, claiming no name and
        needing no secret (join, part and send are refused with ``forbidden``)."""
        return cls(broker, p.LOOKER, secrets.token_urlsafe(24), **kwargs)  # type: ignore[arg-type]

    @property
    def looking(self) -> bool:
        """True for a look-only session."""
        return self.name == p.LOOKER

    # ------------------------------------------------------------ life cycle

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(kind)
        sock.linger = 0
        if self.plaintext:
            sock.plain_username = self.name.encode()
            sock.plain_password = self.secret.encode()
        else:
            assert self.server_key is not None, "connect() learns the broker's key first"
            sock.curve_serverkey = self.server_key.encode()
            sock.curve_publickey = self.public_key
            sock.curve_secretkey = self._secret_key
        self._socks.append(sock)
        return sock

    async def connect(self, timeout: float = 5.0) -> p.Welcome:
        """Say hello; raise AuthError if the name is refused, ConnectError on silence,
        BrokerKeyError if the broker's key is unknown or not the pinned one (then
        nothing but the plain key request was sent)."""
        if not self.plaintext and self.server_key is None:
            from zchat import keys

            try:
                _, self.server_key = await keys.broker_key(self.address, self._ctx, self.trust_new_broker)
            except keys.KeyError_ as exc:
                raise BrokerKeyError("broker_key", str(exc)) from None
        welcome = await self._hello(timeout)
        if welcome.name == p.LOOKER and not self.looking:
            welcome = await self._claim(timeout)
        self._take_welcome(welcome)
        self._auth_failed = None  # a refusal from now on (a revoked key) closes the client: see _watch
        sub = self._socket(zmq.SUB)
        sub.rcvhwm = self.sub_hwm
        sub.connect(f"{self.base}:{welcome.pub_port}")
        self._sub = _Pump(sub, self._on_event)
        topics = (p.SYSTEM_TOPIC,) if self.looking else (p.SYSTEM_TOPIC, p.inbox_topic(self.name))
        for topic in topics:
            self._sub.submit(lambda s, t=topic: s.setsockopt(zmq.SUBSCRIBE, t))
        self._spawn(self._sub.run(), self._heartbeats(), self._resends(), self._filler())
        self._set_state("connected")
        return welcome

    async def _hello(self, timeout: float) -> p.Welcome:
        """Dial the DEALER and say hello on it; close everything and raise on refusal or silence."""
        loop = asyncio.get_running_loop()
        self._auth_failed = loop.create_future()
        self._dial()
        hello = asyncio.ensure_future(self._request(lambda rid: p.Hello(rid=rid, client=self.label), timeout=None))
        done, _ = await asyncio.wait({hello, self._auth_failed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._auth_failed in done or hello not in done:
            hello.cancel()
            await self.close()
            if self._auth_failed.done() and self.looking:
                raise AuthError(p.ErrorCode.FORBIDDEN, f"the broker at {self.broker} refused a look-only session: give --name")
            if self._auth_failed.done():
                raise AuthError(
                    p.ErrorCode.NAME_TAKEN,
                    f"the broker refused the name {self.name!r}: it belongs to someone else (or your key changed), "
                    "it is reserved, or the broker's registration needs an invite or an admin (its log says which)",
                )
            raise ConnectError("unreachable", f"no answer from the broker at {self.broker} within {timeout:g}s")
        return hello.result()

    async def _claim(self, timeout: float) -> p.Welcome:
        """Our key owns no name yet: ask for ours on this look-only session, then dial
        again; the broker's ZAP handler finishes the claim at that handshake (or refuses
        it: the name is taken, reserved, or registration says no).

        The claim carries the SHA-256 digest of the name's secret, never the secret
        (from which our key is derived): a broker that holds that digest from the PLAIN
        era moves the name to our key; any other broker learns nothing from it."""
        from zchat import auth

        proof = auth.digest(self.secret.encode()).hex() if self.plaintext is False and self.secret else ""
        try:
            await self._request(lambda rid: p.Claim(rid=rid, name=self.name, secret=proof, invite=self.invite), timeout=timeout)
        except (ClientError, asyncio.TimeoutError):
            await self.close()
            raise
        try:  # end the look-only session now rather than leave it to time out
            await self._request(lambda rid: p.Bye(rid=rid), timeout=min(timeout, 1.0), retry=False)
        except (ClientError, asyncio.TimeoutError):
            pass
        self._hang_up()
        welcome = await self._hello(timeout)
        if welcome.name != self.name:
            await self.close()
            raise AuthError(p.ErrorCode.NAME_TAKEN, f"the broker did not give this key the name {self.name!r}")
        log.info("this key now owns the name %r at %s", self.name, self.broker)
        return welcome

    def _dial(self) -> None:
        """Open the DEALER (routing id = session id) and its pump and monitor."""
        dealer = self._socket(zmq.DEALER)
        dealer.routing_id = self.sid.encode()
        dealer.sndhwm = 100_000  # chat lines go here too: a burst must not hit the default 1,000
        # An inproc address of our own: pyzmq's default is named after the socket's fd,
        # which a DEALER made right after another was closed can reuse before libzmq has
        # released the old monitor's address (EADDRINUSE at a redial or a claim).
        monitor = dealer.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED, addr=f"inproc://zchat-client-monitor-{secrets.token_hex(8)}"
        )
        self._socks.append(monitor)
        dealer.connect(self.broker)
        self._dealer = _Pump(dealer, self._on_reply)
        self._dealing = (dealer, monitor, asyncio.ensure_future(self._dealer.run()), asyncio.ensure_future(self._watch(monitor)))
        self._tasks += self._dealing[2:]

    def _hang_up(self) -> None:
        """Close the DEALER, its pump and monitor, and take a new session id for the next."""
        dealer, monitor, *tasks = self._dealing
        self._dealer.stop()
        for task in tasks:
            task.cancel()
            self._tasks.remove(task)
        for sock in (dealer, monitor):
            sock.close(linger=0)
            self._socks.remove(sock)
        self.sid = secrets.token_hex(8)

    def _redial(self) -> None:
        """Start over on a new DEALER with a new session id, after pings went unanswered.

        The broker takes no second connection with a routing id it still holds (so
        nobody can take a session over), and a connection that went silent without
        closing (a network that drops, a NAT that forgets) may be held until its
        TCP keepalive gives up, or is never left by our DEALER at all. A new id gets a
        new route at once; the broker answers it no_session and we say hello again.
        Unacked sends are re-addressed to the new session (their cids, so the
        broker's dedup, stay the same).
        """
        self._hang_up()
        log.info("no answer from %s on this connection: connecting again as a new session", self.broker)
        for pending in self._pending.values():
            pending.data = p.encode(msgspec.structs.replace(p.decode_send(pending.data, 0), sid=self.sid))
        self._outbox.clear()  # all of it is pending: resent after the hello
        self._dial()

    def _take_welcome(self, welcome: p.Welcome) -> None:
        # At the first hello a DM conversation we do not track is from before this run:
        # new messages only. At a later one (a broker restart) it began while we ran.
        again = self.welcome is not None
        self.welcome = welcome
        self.boot, self.heartbeat, self.max_bytes = welcome.boot, welcome.heartbeat, welcome.max_bytes
        if self.epoch and welcome.epoch != self.epoch:
            self._reset_epoch(welcome.epoch)
        self.epoch = welcome.epoch
        for room, head in welcome.rooms.items():
            if p.is_dm_room(room):
                tracker = self._tracker_for(room, 0 if again else head)
                tracker.saw_head(head)
            elif room in self._trackers:
                self._trackers[room].saw_head(head)
        self._wake_filler(*self._trackers)

    def _spawn(self, *coros) -> None:  # type: ignore[no-untyped-def]
        for coro in coros:
            self._tasks.append(asyncio.ensure_future(coro))

    async def close(self) -> None:
        """Say goodbye (briefly, if the broker is there) and release every socket."""
        if self.state == "connected":
            try:
                await self._request(lambda rid: p.Bye(rid=rid), timeout=0.5, retry=False)
            except (ClientError, asyncio.TimeoutError):
                pass
        if self._rejoining is not None:
            self._tasks.append(self._rejoining)
            self._rejoining = None
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: closing must never hang its caller
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks.clear()
        for sock in self._socks:
            sock.close(linger=0)
        self._socks.clear()
        for fut in list(self._waiting.values()) + [pend.future for pend in self._pending.values()]:
            if not fut.done():
                fut.set_exception(ClientError("closed", "client closed"))
        self._set_state("closed")
        self._events.put_nowait(None)

    def _emit(self, *events: Event) -> None:
        self._hand_over(list(events))

    def _hand_over(self, events: list[Event]) -> None:
        """To the listener if there is one, else to the queue ``events()`` reads."""
        if self._listener is not None:
            try:
                self._listener(events)
            except Exception:  # the listener's bug must not stop delivery or the client
                log.exception("event listener failed")
        else:
            self._events.put_nowait(events)

    def listen(self, handler: Callable[[list[Event]], None] | None) -> None:
        """Hand events to ``handler`` as they arrive instead of queueing them for
        ``events()``/``batches()``; ``None`` goes back to queueing.

        The handler is called on the event loop, in order, with lists of events (as
        ``batches()`` yields them). It must not block, and it cannot await: it is for
        consumers that must keep up with thousands of lines a second (bridges, the
        benchmark), with no task switch per arrival. An exception it raises is logged
        and does not stop delivery. Events queued before the call go to it first.
        """
        self._listener = handler
        if handler is None:
            return
        queued: list[Event] = []
        closed = False
        while not self._events.empty():
            chunk = self._events.get_nowait()
            if chunk is None:
                closed = True
            else:
                queued += chunk
        if queued:
            self._hand_over(queued)
        if closed:
            self._events.put_nowait(None)

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def events(self) -> AsyncIterator[Event]:
        """Messages (in seq order per room, no gap, no duplicate), presence, state changes."""
        while True:
            chunk = await self._events.get()
            if chunk is None:
                return
            for event in chunk:
                yield event

    async def batches(self) -> AsyncIterator[list[Event]]:
        """The same events as ``events()``, in lists of what arrived together.

        For consumers that keep up with thousands of messages a second (bots, bridges,
        the benchmark, a screen redrawn once per batch): one await per batch, not per event.
        """
        while True:
            chunk = await self._events.get()
            if chunk is None:
                return
            yield chunk

    def cursors(self) -> dict[str, tuple[str, int]]:
        """room -> (epoch, last seq delivered); give it back to a later Client.

        Includes conversations left with ``part`` and cursors given but not used yet."""
        return {**self._cursors, **{room: (t.epoch, t.last) for room, t in self._trackers.items()}}

    def _start_from(self, room: str, epoch: str) -> int | None:
        """The seq a new tracker of ``room`` starts after, from a cursor (used once), or
        None. A cursor from an earlier run makes its first catch-up bounded."""
        cursor = self._cursors.pop(room, None)
        given = room in self._given
        self._given.discard(room)
        if cursor is None or cursor[0] != epoch or cursor[1] < 0:
            return None
        if given:
            self._catch_up.add(room)
        return cursor[1]

    # ------------------------------------------------------------ requests

    async def _request(
        self, make: Callable[[int], p.Request], timeout: float | None = 10.0, retry: bool = True, rehello: bool | None = None,
    ) -> p.Reply:
        """Ask and await the reply. With ``retry``: after no_session, hello and ask once
        more (unless ``rehello`` is False); after rate_limited, wait the broker's
        retry_after and ask again (at most RATE_RETRIES times, RATE_WAIT_MAX seconds in
        all), so a short wait is a delay, not a failure."""
        waited = 0.0
        rehello = retry if rehello is None else rehello
        for attempt in range(RATE_RETRIES + 2):
            reply = await self._ask(make, timeout)
            if not isinstance(reply, p.Error):
                return reply
            if reply.code == p.ErrorCode.NO_SESSION and rehello:  # the broker restarted: hello, then again
                rehello = False
                await self._rehello()
                continue
            wait = max(reply.retry_after, 0.01)
            if reply.code == p.ErrorCode.RATE_LIMITED and retry and attempt < RATE_RETRIES and waited + wait <= RATE_WAIT_MAX:
                log.info("request rate limited; asking again in %.2fs", wait)
                waited += wait
                await asyncio.sleep(wait)
                continue
            raise ClientError(reply.code, reply.message, reply.retry_after)
        raise ClientError(reply.code, reply.message, reply.retry_after)

    async def _ask(self, make: Callable[[int], p.Request], timeout: float | None) -> p.Reply:
        """One request on the wire, at most MAX_IN_FLIGHT at once: the broker queues at most
        a few replies for a connection (its send queue is sized in bytes, replies reach
        1 MiB) and drops what does not fit, so a client never asks for more at once."""
        async with asyncio.timeout(timeout):  # the wait for a slot counts too
            async with self._slots:
                self._rid += 1
                rid = self._rid
                fut = asyncio.get_running_loop().create_future()
                self._waiting[rid] = fut
                data = p.encode(make(rid))
                self._dealer.submit(lambda s: s.send(data, NOBLOCK))
                try:
                    return await fut
                finally:
                    self._waiting.pop(rid, None)

    async def join(self, room: str, history: int = 0) -> list[p.Member]:
        """Join ``room`` and start receiving it: ``history`` earlier messages first, then live.

        With a cursor from an earlier run, everything after it is delivered instead (up to
        ``recover_limit``).
        """
        joined = await self._request(lambda rid: p.Join(rid=rid, room=room))
        assert isinstance(joined, p.Joined)
        tracker = self._trackers.get(room)
        if tracker is None:
            last = self._start_from(room, joined.epoch)
            if last is None:
                last = max(0, joined.head - history)
            tracker = self._trackers[room] = Tracker(room, joined.epoch, last)
        tracker.saw_head(joined.head)
        self._subscribe(room)
        self._wake_filler(room)
        return joined.members

    async def part(self, room: str) -> None:
        """Leave ``room`` (or close a DM conversation: a later line of it is delivered
        from where it was left, not from its start)."""
        await self._request(lambda rid: p.Part(rid=rid, room=room))
        tracker = self._trackers.pop(room, None)
        if tracker is not None and p.is_dm_room(room):
            self._cursors[room] = (tracker.epoch, tracker.last)
        self._catch_up.discard(room)
        self._rejoin.discard(room)
        self._unsubscribe(room)

    def _subscribe(self, room: str, again: bool = False) -> None:
        """Subscribe to a room once: SUB counts subscriptions, so a second SUBSCRIBE would
        need a second UNSUBSCRIBE. ``again`` re-sends it (unsubscribe, subscribe) for a
        broker that refused it before the room was joined again."""
        if p.is_dm_room(room):
            return  # DM conversations come on the inbox topic
        topic = p.room_topic(room)
        if room in self._subscribed:
            if again:
                self._sub.submit(lambda s: (s.setsockopt(zmq.UNSUBSCRIBE, topic), s.setsockopt(zmq.SUBSCRIBE, topic)))
            return
        self._subscribed.add(room)
        self._sub.submit(lambda s: s.setsockopt(zmq.SUBSCRIBE, topic))

    def _unsubscribe(self, room: str) -> None:
        if room in self._subscribed:
            self._subscribed.discard(room)
            topic = p.room_topic(room)
            self._sub.submit(lambda s: s.setsockopt(zmq.UNSUBSCRIBE, topic))

    async def history(self, room: str, limit: int = 100, before: int = 0, after: int = -1) -> list[p.Msg]:
        """Stored messages, oldest first (see protocol.History for the bounds): all that
        was asked, even when the broker cuts pages to its reply size (``more``)."""
        out: list[p.Msg] = []
        while True:
            want = limit - len(out)
            reply = await self._request(lambda rid: p.History(rid=rid, room=room, limit=want, before=before, after=after))
            assert isinstance(reply, p.HistoryReply)
            out += [msgspec.structs.replace(m, epoch=reply.epoch) for m in reply.messages]
            if not reply.more or not reply.messages or len(out) >= limit:
                return out
            after = reply.messages[-1].seq  # the rest of the same selection, oldest first

    async def who(self, room: str) -> list[p.Member]:
        """A room's members by name, every page (up to MAX_LIST_PAGES)."""
        members: list[p.Member] = []
        after = ""
        for _ in range(MAX_LIST_PAGES):
            reply = await self._request(lambda rid: p.Who(rid=rid, room=room, after=after))
            assert isinstance(reply, p.WhoReply)
            members += reply.members
            if not reply.more or not reply.members or reply.members[-1].name <= after:
                return members
            after = reply.members[-1].name
        log.warning("who %s: stopped after %d pages (%d members)", room, MAX_LIST_PAGES, len(members))
        return members

    async def rooms(self) -> list[p.RoomInfo]:
        """Public rooms by name, every page (up to MAX_LIST_PAGES)."""
        rooms: list[p.RoomInfo] = []
        after = ""
        for _ in range(MAX_LIST_PAGES):
            reply = await self._request(lambda rid: p.Rooms(rid=rid, after=after))
            assert isinstance(reply, p.RoomsReply)
            rooms += reply.rooms
            if not reply.more or not reply.rooms or reply.rooms[-1].name <= after:
                return rooms
            after = reply.rooms[-1].name
        log.warning("rooms: stopped after %d pages (%d rooms)", MAX_LIST_PAGES, len(rooms))
        return rooms

    async def status(self, timeout: float = 5.0) -> p.StatusReply:
        """What the broker is doing (version, uptime, counts, rates, limits): for its
        operator; a look-only session may ask. Raises ClientError as any request does."""
        reply = await self._request(lambda rid: p.Status(rid=rid), timeout=timeout)
        if not isinstance(reply, p.StatusReply):
            raise ClientError(p.ErrorCode.INTERNAL, f"expected a status reply, got {type(reply).__name__}")
        return reply

    # ------------------------------------------------------------ keys and invites

    async def make_invite(self, timeout: float = 5.0) -> str:
        """A one-use invite code (broker admins only)."""
        reply = await self._request(lambda rid: p.Invite(rid=rid), timeout=timeout)
        return reply.code  # type: ignore[union-attr]

    async def list_keys(self, timeout: float = 5.0) -> list[str]:
        """The Z85 public keys that own this name at the broker (one per device)."""
        reply = await self._request(lambda rid: p.KeyList(rid=rid), timeout=timeout)
        return list(reply.keys)  # type: ignore[union-attr]

    async def add_key(self, key: str, timeout: float = 5.0) -> None:
        """Authorise another device's public key for this name."""
        await self._request(lambda rid: p.KeyAdd(rid=rid, key=key), timeout=timeout)

    async def revoke_key(self, key: str, timeout: float = 5.0) -> None:
        """Take a key away from this name: refused from its next handshake on, and its
        live connections are cut."""
        await self._request(lambda rid: p.KeyRevoke(rid=rid, key=key), timeout=timeout)

    async def _refused_later(self) -> None:
        log.error("the broker at %s now refuses this key (revoked?): closing", self.broker)
        await self.close()

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time in seconds."""
        start = time.perf_counter()
        await self._request(lambda rid: p.Ping(rid=rid), timeout=timeout)
        return time.perf_counter() - start

    def _on_reply(self, frames: list[bytes]) -> None:
        reply = p.decode_reply(frames[-1])
        if isinstance(reply, p.Ack):
            for stored in reply.stored:
                self._acked(stored.cid, stored)
            return
        if isinstance(reply, p.Error):
            if reply.code == p.ErrorCode.NO_SESSION:
                asyncio.ensure_future(self._rehello())
                if reply.cid:
                    return  # the send stays pending and goes again after hello
            elif reply.code == p.ErrorCode.SHUTTING_DOWN:
                self._set_state("reconnecting", "broker shutting down")
            if reply.cid:
                self._send_failed(reply)
                return
            if not reply.rid and reply.code not in (p.ErrorCode.NO_SESSION, p.ErrorCode.SHUTTING_DOWN):
                # it names nothing we sent (those two are handled above): tell the user, do not drop it
                log.warning("the broker reported %s: %s", reply.code, reply.message)
                self._emit(Problem(reply.code, reply.message))
                return
        fut = self._waiting.get(getattr(reply, "rid", 0))
        if fut is not None and not fut.done():
            fut.set_result(reply)

    # ------------------------------------------------------------ sending

    async def send(self, room: str, text: str, *, me: bool = False, timeout: float | None = None) -> p.Stored:
        """Send to a room; returns once the broker has stored it (resending until then)."""
        return await self._wait(self.post(room, text, me=me), timeout)

    async def send_dm(self, to: str, text: str, *, me: bool = False, timeout: float | None = None) -> p.Stored:
        """Send a direct message that only ``to`` (and your other devices) receive."""
        return await self._wait(self.post_dm(to, text, me=me), timeout)

    def post(self, room: str, text: str, *, me: bool = False) -> asyncio.Future:
        """Queue a send without awaiting it: a future of its Stored (for bulk senders;
        no coroutine or task per message). Resent until acked, like ``send``. Lines
        posted in one turn of the event loop travel to the broker in one frame."""
        return self._submit(room, "", text, me)

    def post_dm(self, to: str, text: str, *, me: bool = False) -> asyncio.Future:
        return self._submit("", to, text, me)

    def _submit(self, room: str, to: str, text: str, me: bool) -> asyncio.Future:
        self._cid_count += 1
        cid = f"{self._cid_base}{self._cid_count:x}"  # no random draw per line
        data = p.encode(p.Send(sid=self.sid, cid=cid, text=text, room=room, to=to, me=me))
        if len(data) > self.max_bytes:
            raise ClientError(p.ErrorCode.TOO_LARGE, f"message is {len(data)} bytes encoded; the broker takes at most {self.max_bytes}")
        fut = asyncio.get_running_loop().create_future()
        self._pending[cid] = _Pending(data, fut, time.monotonic())
        outbox = self._outbox
        if not outbox and self._dealer.send_now(data):
            return fut  # a lone line goes at once: a quiet chat pays no extra loop turn
        outbox.append(data)
        if len(outbox) == 1:  # the pump packs what else this turn posts into one frame
            self._dealer.submit(self._flush)
        return fut

    def _queue(self, data: bytes) -> None:
        outbox = self._outbox
        outbox.append(data)
        if len(outbox) == 1:  # the first of this turn: the pump packs them all when it runs
            self._dealer.submit(self._flush)

    def _flush(self, sock: zmq.Socket) -> None:
        """Send the outbox: a lone line as a Send, several as Sends frames within max_bytes."""
        outbox, self._outbox = self._outbox, []
        if len(outbox) == 1:
            sock.send(outbox[0], NOBLOCK)
            return
        room = self.max_bytes - 64  # the Sends envelope around the items
        group: list[msgspec.Raw] = []
        size = 0
        for data in outbox:
            if group and (size + len(data) > room or len(group) == p.MAX_SENDS_ITEMS):
                self._send_group(sock, group)
                group, size = [], 0
            group.append(msgspec.Raw(data))
            size += len(data)
        self._send_group(sock, group)

    @staticmethod
    def _send_group(sock: zmq.Socket, group: list[msgspec.Raw]) -> None:
        """A lone line goes as its own Send: wrapped in Sends, a line near the limit
        would be over it (65,555 > 65,536 bytes) and refused."""
        sock.send(p.encode(p.Sends(items=group)) if len(group) > 1 else bytes(group[0]), NOBLOCK)  # type: ignore[arg-type]

    async def _wait(self, fut: asyncio.Future, timeout: float | None) -> p.Stored:
        """Await a posted send. On timeout or cancellation it is no longer resent, but it
        is unconfirmed rather than cancelled: a copy already queued may still be stored."""
        try:
            if timeout is None:
                return await fut
            return await asyncio.wait_for(fut, timeout)
        except BaseException:
            self._forget_done()
            raise

    def _forget_done(self) -> None:
        """Stop resending posts whose future is settled (given up or cancelled)."""
        for cid in [cid for cid, pending in self._pending.items() if pending.future.done()]:
            del self._pending[cid]

    def _acked(self, cid: str, stored: p.Stored) -> None:
        pending = self._pending.pop(cid, None)
        if pending is not None and not pending.future.done():
            pending.future.set_result(stored)

    def _send_failed(self, err: p.Error) -> None:
        if err.code in _RESEND:
            return  # stays pending: resent after ack_timeout
        pending = self._pending.pop(err.cid, None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(ClientError(err.code, err.message, err.retry_after))

    async def _resends(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ack_timeout / 2))
            if self.state != "connected":
                continue
            self._forget_done()
            now = time.monotonic()
            for pending in self._pending.values():
                if now - pending.sent >= self.ack_timeout:
                    pending.sent = now
                    self._queue(pending.data)

    # ------------------------------------------------------------ receiving

    def _tracker_for(self, room: str, head: int = 0) -> Tracker:
        tracker = self._trackers.get(room)
        if tracker is None:
            last = self._start_from(room, self.epoch)
            if last is None:
                last = head  # a conversation from before this run: new messages only
            tracker = self._trackers[room] = Tracker(room, self.epoch, last)
        return tracker

    def _on_event(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        event = p.decode_event(frames[1])
        kind = type(event)
        if kind is p.Batch:
            items = event.items  # type: ignore[union-attr]
            if self._pending:
                for msg in items:
                    self._own(msg)
            # A room topic's batch is a run of that room: take it whole when it follows on.
            if items and frames[0][:1] == p.ROOM_PREFIX and items[0].epoch == self.epoch == items[-1].epoch:
                tracker = self._trackers.get(items[0].room)
                if tracker is not None and tracker.offer_run(items):
                    self._hand_over(items)
                    return
            out: list[Event] = []
            for msg in items:
                self._on_msg(msg, out)
            if out:
                self._hand_over(out)
        elif kind is p.Msg:
            if self._pending:
                self._own(event)  # type: ignore[arg-type]
            out = []
            self._on_msg(event, out)  # type: ignore[arg-type]
            if out:
                self._hand_over(out)
        elif kind is p.Presence:
            if event.room in self._trackers:  # type: ignore[union-attr]
                self._emit(event)  # type: ignore[arg-type]
        elif kind is p.Heads:
            self._on_heads(event)  # type: ignore[arg-type]
        elif kind is p.Notice:
            if event.event == "shutdown" and event.boot == self.boot:  # type: ignore[union-attr]
                self._set_state("reconnecting", "broker shut down")

    def _on_heads(self, event: p.Heads) -> None:
        """A subscription took effect: what was published before it is fetched now,
        not at the next heartbeat."""
        if event.epoch == self.epoch:
            self._saw_heads(event.heads)

    def _own(self, msg: p.Msg) -> None:
        """Our own line seen on SUB counts as its ack (the Ack may come later)."""
        if msg.sender == self.name and msg.cid in self._pending:
            self._acked(msg.cid, p.Stored(msg.cid, msg.room, msg.seq, msg.id, msg.ts))

    def _on_msg(self, event: p.Msg, out: list[Event]) -> None:
        if event.epoch != self.epoch:
            return  # the heartbeat will notice the new epoch and reset
        tracker = self._trackers.get(event.room)
        if tracker is None:
            if not p.is_dm_room(event.room):
                return
            tracker = self._tracker_for(event.room)  # a new conversation: from its first message
        out += tracker.offer(event)
        if tracker.early:
            self._wake_filler(event.room)

    def _wake_filler(self, *rooms: str) -> None:
        self._want_fill.update(rooms)
        self._fill_wake.set()

    async def _filler(self) -> None:
        """Fetch from history what trackers miss, one room at a time, for the client's
        whole life: a failure is logged and the room tried again a second later."""
        while True:
            await self._fill_wake.wait()
            self._fill_wake.clear()
            while self._want_fill:
                room = self._want_fill.pop()
                try:
                    await self._fill(room)
                except (ClientError, asyncio.TimeoutError) as exc:
                    log.info("could not fill %s yet: %s", room, exc)
                    self._want_fill.add(room)
                    await asyncio.sleep(1.0)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug must not end recovery for the client's lifetime
                    log.exception("filling %s from history failed; trying again", room)
                    self._want_fill.add(room)
                    await asyncio.sleep(1.0)

    async def _fill(self, room: str) -> None:
        """Page through history until ``room``'s tracker misses nothing. Every round
        delivers or skips something, so this ends once the reader has caught up, however
        far behind it was. Only the first catch-up after being away (a cursor from an
        earlier run) is cut to the newest ``recover_limit``, with a Gap for the rest."""
        while True:
            tracker = self._trackers.get(room)
            if tracker is None or (gap := tracker.missing()) is None:
                self._catch_up.discard(room)
                return
            after, before = gap
            upper = before - 1 if before else tracker.known_head
            if room in self._catch_up:
                self._catch_up.discard(room)
                if upper - after > self.recover_limit:  # away too long: keep only the newest
                    gap_event = tracker.skip(upper - max(0, self.recover_limit), "beyond the recovery limit")
                    if gap_event is not None:
                        self._emit(gap_event)
                    continue
            wanted = upper - after
            reply = await self._request(
                lambda rid: p.History(rid=rid, room=room, limit=min(wanted, p.MAX_HISTORY), before=before, after=after)
            )
            assert isinstance(reply, p.HistoryReply)
            if reply.epoch != tracker.epoch or self._trackers.get(room) is not tracker:
                return  # reset or parted meanwhile
            progress = tracker.last
            msgs = [msgspec.structs.replace(m, epoch=reply.epoch) for m in reply.messages]
            if not msgs or msgs[0].seq > after + 1:
                first_held = msgs[0].seq if msgs else (before or reply.head + 1)
                gap_event = tracker.skip(first_held - 1, "no longer in history")
                if gap_event is not None:
                    self._emit(gap_event)
            tracker.saw_head(reply.head)
            delivered: list[Event] = [*tracker.fill(msgs, 0), *tracker.release()]
            if delivered:
                self.recovered += len(delivered)
                self._hand_over([*delivered, Recovered(room, len(delivered))])
            if not msgs and tracker.missing() == gap:
                gap_event = tracker.skip(upper, "no longer in history")
                tail: list[Event] = [*([gap_event] if gap_event is not None else []), *tracker.release()]
                if tail:
                    self._hand_over(tail)
                return
            if tracker.last == progress and tracker.missing() == gap:
                log.warning("history of %s did not fill seqs %d..%d; trying later", room, after + 1, upper)
                return

    # ------------------------------------------------------------ liveness

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            self.state, self.state_since = state, time.time()
            self._emit(StateChange(state, self.state_since, detail))

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                log.warning("handshake refused by %s (status %s)", self.broker, event["value"])
                if self._auth_failed is not None and not self._auth_failed.done():
                    self._auth_failed.set_result(event["value"])
                elif self.state != "closed" and not self.plaintext:  # refused after we were in: revoked
                    asyncio.ensure_future(self._refused_later())

    async def _heartbeats(self) -> None:
        """Ping every heartbeat: keeps presence alive, detects a lost broker and lost tails."""
        unanswered = 0  # pings in a row with no answer
        while True:
            await asyncio.sleep(self.heartbeat if self.state == "connected" else min(1.0, self.heartbeat))
            try:
                pong = await self._request(lambda rid: p.Ping(rid=rid), timeout=max(1.0, self.heartbeat))
            except ClientError as exc:  # no_session: _on_reply already says hello again
                if exc.code != p.ErrorCode.NO_SESSION:
                    self._set_state("reconnecting", exc.message)
                continue
            except asyncio.TimeoutError:
                self._set_state("reconnecting", "broker not answering")
                unanswered += 1
                if unanswered % REDIAL_AFTER == 0:
                    self._redial()
                continue
            unanswered = 0
            assert isinstance(pong, p.Pong)
            if pong.boot != self.boot or pong.epoch != self.epoch:
                await self._rehello()
                continue
            if self.state != "connected":
                self._set_state("connected")
                self._resend_all()
            self._saw_heads(pong.heads)
            if self._rejoin and time.monotonic() >= self._rejoin_at and (self._rejoining is None or self._rejoining.done()):
                # its own task: waits for rate limits must not hold up the heartbeat
                self._rejoining = asyncio.ensure_future(self._rejoin_rooms(sorted(self._rejoin)))

    def _saw_heads(self, heads: dict[str, int]) -> None:
        """Heads from a Pong or a Heads event: fetch what is beyond what we delivered. A DM
        conversation we do not track began during this run (its first line was lost on
        the way): track it from its start, as that line would have."""
        for room, head in heads.items():
            tracker = self._trackers.get(room)
            if tracker is None:
                if self.looking or not p.is_dm_room(room) or p.dm_peers(room) is None:
                    continue
                tracker = self._tracker_for(room)
            if head > tracker.last:
                tracker.saw_head(head)
                self._wake_filler(room)

    async def _rehello(self) -> None:
        """The broker restarted (or forgot us): new session, same rooms, resend what is unacked."""
        boot = self.boot
        async with self._rehello_lock:
            if self.boot != boot:
                return  # another task has just said hello to the new broker
            try:
                await self._hello_again()
            except (ClientError, asyncio.TimeoutError) as exc:
                log.info("hello again failed (%s); the next heartbeat retries", exc)

    async def _hello_again(self) -> None:
        welcome = await self._request(lambda rid: p.Hello(rid=rid, client=self.label))
        assert isinstance(welcome, p.Welcome)
        epoch_changed = welcome.epoch != self.epoch
        old = self.welcome
        self._take_welcome(welcome)
        if old is not None and old.pub_port != welcome.pub_port:
            self._move(self._sub, old.pub_port, welcome.pub_port)
        if epoch_changed:  # the new broker knows none of our rooms: join and subscribe again
            await self._rejoin_rooms([r for r in self._trackers if not p.is_dm_room(r)])
        self._set_state("connected")
        self._resend_all()

    async def _rejoin_rooms(self, rooms: list[str]) -> None:
        """Join each room again; one that fails does not stop the others. Transient
        failures are retried from the heartbeat (every REJOIN_RETRY seconds), final
        refusals drop the room with a Problem event."""
        for room in rooms:
            if room not in self._trackers:
                self._rejoin.discard(room)
                continue
            try:
                # no hello from here (we may hold the hello lock): no_session is retried later
                joined = await self._request(lambda rid, r=room: p.Join(rid=rid, room=r), rehello=False)
            except asyncio.TimeoutError:
                self._rejoin.add(room)
                continue
            except ClientError as exc:
                if exc.code in _TRANSIENT or exc.code == "closed":
                    self._rejoin.add(room)
                    continue
                log.warning("could not rejoin %s: %s [%s]", room, exc.message, exc.code)
                self._rejoin.discard(room)
                self._trackers.pop(room, None)
                self._unsubscribe(room)
                self._emit(Problem(exc.code, f"could not rejoin #{room}: {exc.message}"))
                continue
            assert isinstance(joined, p.Joined)
            self._rejoin.discard(room)
            tracker = self._trackers.get(room)
            if tracker is not None:
                tracker.saw_head(joined.head)
                self._wake_filler(room)
            self._subscribe(room, again=True)
        if self._rejoin:
            self._rejoin_at = time.monotonic() + REJOIN_RETRY
            log.info("will retry joining %s", ", ".join(sorted(self._rejoin)))

    def _move(self, pump: _Pump, old: int, new: int) -> None:
        """The restarted broker listens on other ports (it was bound to port 0)."""

        def move(sock: zmq.Socket) -> None:
            sock.disconnect(f"{self.base}:{old}")
            sock.connect(f"{self.base}:{new}")

        pump.submit(move)

    def _resend_all(self) -> None:
        self._forget_done()
        for pending in self._pending.values():
            pending.sent = time.monotonic()
            self._queue(pending.data)

    def _reset_epoch(self, epoch: str) -> None:
        """The broker's history was replaced: report it and start each room afresh."""
        self._catch_up.clear()
        self._cursors = {room: c for room, c in self._cursors.items() if c[0] == epoch}
        for room, tracker in self._trackers.items():
            self._emit(Gap(room, 1, tracker.last, "the broker's history was reset"))
            self._trackers[room] = Tracker(room, epoch, 0)
            # A new epoch may still hold all the old history (a store renumbered after a
            # crash keeps its messages): catch up as after being away, within recover_limit.
            self._catch_up.add(room)
