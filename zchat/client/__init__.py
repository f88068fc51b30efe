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

The package, one file per concern: connection (sockets, handshake, dial/redial,
liveness), pump (one socket's callbacks), requests (join, who, history...), sending
(post/send, acks, resends), receiving (events, trackers, the filler) and events (the
errors and events callers see). ``Client`` is one class made of their mixins.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from zchat import protocol as p
from zchat.client.connection import (
    REDIAL_AFTER,
    REJOIN_RETRY,
    Connection,
    split_addresses,
    split_broker,
)
from zchat.client.events import (
    AuthError,
    BrokerKeyError,
    ClientError,
    ConnectError,
    Event,
    Problem,
    Recovered,
    StateChange,
)
from zchat.client.pump import _Pump
from zchat.client.receiving import Receiving
from zchat.client.requests import (
    MAX_IN_FLIGHT,
    MAX_LIST_PAGES,
    RATE_RETRIES,
    RATE_WAIT_MAX,
    Requests,
)
from zchat.client.sending import Sending, _Pending
from zchat.recovery import Gap, Tracker
from zchat.sockio import close_monitored

__all__ = ["Client", "split_addresses", "ClientError", "AuthError", "ConnectError", "StateChange", "Recovered", "Gap", "Problem", "Event"]
# Also importable from here, as before the split: BrokerKeyError, split_broker, Tracker, the
# bounds (MAX_IN_FLIGHT, REDIAL_AFTER, RATE_RETRIES, RATE_WAIT_MAX, MAX_LIST_PAGES,
# REJOIN_RETRY) and _Pump, _Pending. A bound is read where it is used: patch it there.
_ALSO = (
    BrokerKeyError, split_broker, Tracker, MAX_IN_FLIGHT, REDIAL_AFTER, RATE_RETRIES, RATE_WAIT_MAX, MAX_LIST_PAGES,
    REJOIN_RETRY, _Pump, _Pending,
)


#: Bytes of events a client queues for its caller before it stops reading the fan-out
#: (what was dropped meanwhile is fetched from history once the caller reads again).
UNREAD_LIMIT = 16 * 2**20


class Client(Connection, Requests, Sending, Receiving):
    """A connection to one broker as one user.

    ``cursors`` (room -> (epoch, last seq seen)), as returned by ``cursors()`` at the end
    of an earlier run, lets a returning client receive what it missed, up to
    ``recover_limit`` messages a room (the rest is reported as a Gap). That bound is for
    coming back after being away only: while connected (pauses, a stalled reader, a
    broker restart) everything is fetched from history, page by page, however far behind.

    ``name`` protocol.LOOKER (see ``Client.looker``) is a look-only session.

    Events wait for ``events()``/``batches()`` in a queue bounded at ``unread_limit``
    bytes (about: texts plus a fixed weight an event): a caller that stops reading
    costs that much, then the fan-out is held back, and what it missed meanwhile comes
    from history when it reads again, in order. A ``listen()`` handler has no queue.

    A poster that never reads a room (a bot, ``zchat send``, a notifier) joins it with
    ``join(room, receive=False)`` and pays nothing for the room's traffic; a bulk of
    lines goes with ``post_many`` (one future for all of them).
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
        unread_limit: int = UNREAD_LIMIT,
    ) -> None:
        if name != p.LOOKER and not p.valid_name(name):
            raise ClientError(p.ErrorCode.BAD_NAME, f"bad name {name!r}: use a-z, 0-9, '_', '-' (1-{p.MAX_NAME_LEN} characters, lowercase)")
        try:
            # Several brokers of one set (on one Redis): the client moves to the next when
            # one is lost. Each carries its own key (#k=) or is pinned on its own.
            self.addresses = split_addresses(broker)
        except ValueError as exc:
            raise ClientError(p.ErrorCode.BAD_REQUEST, str(exc)) from None
        if secret is None:
            from zchat.config import load_secret

            secret = load_secret(name)
        self._at = 0
        self.server_key: str | None = None
        self._use(0)  # self.address (as given, maybe with #k=KEY), self.broker (what we connect to), self.base
        # ZCHAT_TRUST_NEW_BROKER=1 is --trust-new-broker for processes without the flag
        # (the compose demo's bots, on the compose network).
        self.trust_new_broker = trust_new_broker or os.environ.get("ZCHAT_TRUST_NEW_BROKER") == "1"
        self.invite_code = invite  # for claiming a name on an invite-only broker
        from zchat import keys

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
        self._subscribed: dict[str, bytes] = {}  # room -> the topic the SUB socket holds for it (once each)
        self._tokens: dict[str, str] = {}  # room -> its wire-topic token (private rooms, rotated ones)
        self._left: dict[str, int] = {}  # room -> seq of the kick/ban line that took us out (bounded)
        self.joined_info: dict[str, p.Joined] = {}  # room -> its Joined reply (private? topic, token)
        self._rejoin: set[str] = set()  # rooms a restarted broker has not taken back yet
        self._posting: set[str] = set()  # rooms joined to post only (join(receive=False)): no tracker, no SUB
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
        self.unread_limit = unread_limit  # bytes of events queued unread before the fan-out is held back
        self._unread = 0  # about how many bytes the queued events hold (receiving.weigh)
        self._reading = asyncio.Event()  # clear: the caller is behind (see Receiving._hold_back)
        self._reading.set()
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
        dealing = getattr(self, "_dealing", None)
        if dealing is not None and dealing[1] in self._socks:  # its monitor stopped first (sockio.close_monitored)
            close_monitored(dealing[0], dealing[1])
        for sock in self._socks:
            sock.close(linger=0)
        self._socks.clear()
        for fut in list(self._waiting.values()) + [pend.future for pend in self._pending.values()]:
            if not fut.done():
                fut.set_exception(ClientError("closed", "client closed"))
        self._set_state("closed")
        self._events.put_nowait(None)

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
