"""zchat.client: the one client library (the TUI, the CLI, the bots, the benchmark and
the tests all talk to the broker through it).

It hides what ZeroMQ's PUB/SUB does not promise: a late subscription, messages dropped
for a slow subscriber, a broker restart. Every room is tracked by sequence number
(zchat.recovery); a gap is filled from history, a duplicate is dropped, and what can
not be recovered is reported as a Gap event. Sends carry a client id (cid) and are
resent until the broker acks them; the broker drops the duplicates.

Each socket is owned by one task (a _Pump); other coroutines hand it work through a queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from typing import AsyncIterator, Callable

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from zchat import protocol as p
from zchat.recovery import Gap, Tracker

log = logging.getLogger(__name__)

__all__ = ["Client", "ClientError", "AuthError", "ConnectError", "StateChange", "Recovered", "Gap", "Event"]


class ClientError(Exception):
    """The broker refused something; ``code`` is a protocol ErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AuthError(ClientError):
    """The handshake was refused: the name is taken (another secret owns it) or invalid."""


class ConnectError(ClientError):
    """The broker did not answer in time."""


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


Event = p.Msg | p.Presence | StateChange | Recovered | Gap


class _Pump:
    """Owns one socket: runs queued operations on it and hands received frames on."""

    def __init__(self, sock: zmq.asyncio.Socket, on_recv: Callable[[list[bytes]], None] | None) -> None:
        self.sock = sock
        self.sync = zmq.Socket.shadow(sock.underlying)
        self.on_recv = on_recv
        self.ops: asyncio.Queue[Callable[[zmq.Socket], None]] = asyncio.Queue()

    def submit(self, op: Callable[[zmq.Socket], None]) -> None:
        self.ops.put_nowait(op)

    async def run(self) -> None:
        get: asyncio.Future | None = None
        recv: asyncio.Future | None = None
        try:
            while True:
                if get is None:
                    get = asyncio.ensure_future(self.ops.get())
                if recv is None and self.on_recv is not None:
                    recv = self.sock.recv_multipart()
                # The timeout is a safety net: ZeroMQ's readiness signal is edge-triggered,
                # and our own sends on the shadow socket can consume an edge.
                done, _ = await asyncio.wait(
                    [f for f in (get, recv) if f is not None], timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                )
                if get in done:
                    op, get = get.result(), None
                    self._run(op)
                    while not self.ops.empty():
                        self._run(self.ops.get_nowait())
                if recv is not None and recv.done():
                    frames, recv = recv.result(), None
                    self._deliver(frames)
                if self.on_recv is not None:
                    self._drain()
        finally:
            for fut in (get, recv):
                if fut is not None:
                    fut.cancel()

    def _drain(self) -> None:
        """Read what is already queued, without futures (and whatever our sends hid)."""
        sync = self.sync
        for _ in range(1000):
            if not sync.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                frames = sync.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._deliver(frames)

    def _run(self, op: Callable[[zmq.Socket], None]) -> None:
        try:
            op(self.sync)
        except zmq.Again:
            log.debug("socket full; the operation will be retried by its owner")

    def _deliver(self, frames: list[bytes]) -> None:
        try:
            self.on_recv(frames)  # type: ignore[misc]
        except p.ProtocolError as exc:
            log.warning("ignored a malformed message from the broker: %s", exc)


@dataclasses.dataclass
class _Pending:
    data: bytes
    future: asyncio.Future
    sent: float


def split_broker(address: str) -> tuple[str, int]:
    base, _, port = address.rpartition(":")
    if not address.startswith("tcp://") or not port.isdigit() or not base[len("tcp://"):]:
        raise ValueError(f"broker address must look like tcp://HOST:PORT, got {address!r}")
    return base, int(port)


class Client:
    """A connection to one broker as one user.

    ``cursors`` (room -> (epoch, last seq seen)), as returned by ``cursors()`` at the end
    of an earlier run, lets a returning client receive what it missed, up to
    ``recover_limit`` messages a room.
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
    ) -> None:
        if not p.valid_name(name):
            raise ClientError(p.ErrorCode.BAD_NAME, f"bad name {name!r}: use a-z, 0-9, '_', '-' (1-{p.MAX_NAME_LEN} characters, lowercase)")
        self.base, _ = split_broker(broker)
        if secret is None:
            from zchat.config import load_secret

            secret = load_secret(name)
        self.broker = broker
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
        self._trackers: dict[str, Tracker] = {}
        self._rid = 0
        self._waiting: dict[int, asyncio.Future] = {}
        self._pending: dict[str, _Pending] = {}
        self._events: asyncio.Queue = asyncio.Queue()
        self._want_fill: set[str] = set()
        self._fill_wake = asyncio.Event()
        self._auth_failed: asyncio.Future | None = None
        self._tasks: list[asyncio.Task] = []
        self._ctx = zmq.asyncio.Context.instance()
        self._socks: list[zmq.asyncio.Socket] = []
        self._rehello_lock = asyncio.Lock()

    # ------------------------------------------------------------ life cycle

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(kind)
        sock.linger = 0
        sock.plain_username = self.name.encode()
        sock.plain_password = self.secret.encode()
        self._socks.append(sock)
        return sock

    async def connect(self, timeout: float = 5.0) -> p.Welcome:
        """Say hello; raise AuthError if the name is refused, ConnectError on silence."""
        loop = asyncio.get_running_loop()
        self._auth_failed = loop.create_future()
        dealer = self._socket(zmq.DEALER)
        dealer.routing_id = self.sid.encode()
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._socks.append(monitor)
        dealer.connect(self.broker)
        self._dealer = _Pump(dealer, self._on_reply)
        self._spawn(self._dealer.run(), self._watch(monitor))
        hello = asyncio.ensure_future(self._request(lambda rid: p.Hello(rid=rid, client=self.label), timeout=None))
        done, _ = await asyncio.wait({hello, self._auth_failed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._auth_failed in done or hello not in done:
            hello.cancel()
            await self.close()
            if self._auth_failed.done():
                raise AuthError(p.ErrorCode.NAME_TAKEN, f"the broker refused the name {self.name!r}: it belongs to someone else (or your secret changed)")
            raise ConnectError("unreachable", f"no answer from the broker at {self.broker} within {timeout:g}s")
        welcome = hello.result()
        self._take_welcome(welcome)
        sub = self._socket(zmq.SUB)
        sub.rcvhwm = self.sub_hwm
        sub.connect(f"{self.base}:{welcome.pub_port}")
        push = self._socket(zmq.PUSH)
        push.sndhwm = 100_000
        push.connect(f"{self.base}:{welcome.pull_port}")
        self._sub = _Pump(sub, self._on_event)
        self._push = _Pump(push, None)
        for topic in (p.SYSTEM_TOPIC, p.inbox_topic(self.name)):
            self._sub.submit(lambda s, t=topic: s.setsockopt(zmq.SUBSCRIBE, t))
        self._spawn(self._sub.run(), self._push.run(), self._heartbeats(), self._resends(), self._filler())
        self._set_state("connected")
        return welcome

    def _take_welcome(self, welcome: p.Welcome) -> None:
        self.welcome = welcome
        self.boot, self.heartbeat, self.max_bytes = welcome.boot, welcome.heartbeat, welcome.max_bytes
        if self.epoch and welcome.epoch != self.epoch:
            self._reset_epoch(welcome.epoch)
        self.epoch = welcome.epoch
        for room, head in welcome.rooms.items():
            if p.is_dm_room(room):
                tracker = self._tracker_for(room, head)
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

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def events(self) -> AsyncIterator[Event]:
        """Messages (in seq order per room, no gap, no duplicate), presence, state changes."""
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event

    def cursors(self) -> dict[str, tuple[str, int]]:
        """room -> (epoch, last seq delivered); give it back to a later Client."""
        return {room: (t.epoch, t.last) for room, t in self._trackers.items()}

    # ------------------------------------------------------------ requests

    async def _request(self, make: Callable[[int], p.Request], timeout: float | None = 10.0, retry: bool = True) -> p.Reply:
        self._rid += 1
        rid = self._rid
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        data = p.encode(make(rid))
        self._dealer.submit(lambda s: s.send(data, zmq.NOBLOCK))
        try:
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(rid, None)
        if isinstance(reply, p.Error):
            if reply.code == p.ErrorCode.NO_SESSION and retry:  # the broker restarted: hello, then again
                await self._rehello()
                return await self._request(make, timeout, retry=False)
            raise ClientError(reply.code, reply.message)
        return reply

    async def join(self, room: str, history: int = 0) -> list[p.Member]:
        """Join ``room`` and start receiving it: ``history`` earlier messages first, then live.

        With a cursor from an earlier run, everything after it is delivered instead (up to
        ``recover_limit``).
        """
        joined = await self._request(lambda rid: p.Join(rid=rid, room=room))
        assert isinstance(joined, p.Joined)
        if room not in self._trackers:
            epoch, last = self._cursors.get(room, ("", -1))
            if epoch != joined.epoch or last < 0:
                last = max(0, joined.head - history)
            self._trackers[room] = Tracker(room, joined.epoch, last)
        self._trackers[room].saw_head(joined.head)
        topic = p.room_topic(room)
        self._sub.submit(lambda s: s.setsockopt(zmq.SUBSCRIBE, topic))
        self._wake_filler(room)
        return joined.members

    async def part(self, room: str) -> None:
        await self._request(lambda rid: p.Part(rid=rid, room=room))
        self._trackers.pop(room, None)
        topic = p.room_topic(room)
        self._sub.submit(lambda s: s.setsockopt(zmq.UNSUBSCRIBE, topic))

    async def history(self, room: str, limit: int = 100, before: int = 0, after: int = -1) -> list[p.Msg]:
        """Stored messages, oldest first (see protocol.History for the bounds)."""
        reply = await self._request(lambda rid: p.History(rid=rid, room=room, limit=limit, before=before, after=after))
        assert isinstance(reply, p.HistoryReply)
        return [msgspec.structs.replace(m, epoch=reply.epoch) for m in reply.messages]

    async def who(self, room: str) -> list[p.Member]:
        reply = await self._request(lambda rid: p.Who(rid=rid, room=room))
        assert isinstance(reply, p.WhoReply)
        return reply.members

    async def rooms(self) -> list[p.RoomInfo]:
        reply = await self._request(lambda rid: p.Rooms(rid=rid))
        assert isinstance(reply, p.RoomsReply)
        return reply.rooms

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
        no coroutine or task per message). Resent until acked, like ``send``."""
        return self._submit(p.Send(sid=self.sid, cid=secrets.token_hex(8), text=text, room=room, me=me))

    def post_dm(self, to: str, text: str, *, me: bool = False) -> asyncio.Future:
        return self._submit(p.Send(sid=self.sid, cid=secrets.token_hex(8), text=text, to=to, me=me))

    def _submit(self, body: p.Send) -> asyncio.Future:
        data = p.encode(body)
        if len(data) > self.max_bytes:
            raise ClientError(p.ErrorCode.TOO_LARGE, f"message is {len(data)} bytes encoded; the broker takes at most {self.max_bytes}")
        fut = asyncio.get_running_loop().create_future()
        cid = body.cid
        self._pending[cid] = _Pending(data, fut, time.monotonic())
        fut.add_done_callback(lambda _: self._pending.pop(cid, None))  # acked, failed or given up
        self._push.submit(lambda s: s.send(data, zmq.NOBLOCK))
        return fut

    @staticmethod
    async def _wait(fut: asyncio.Future, timeout: float | None) -> p.Stored:
        """Await a posted send. On timeout or cancellation it is no longer resent, but it
        is unconfirmed rather than cancelled: a copy already queued may still be stored."""
        if timeout is None:
            return await fut
        return await asyncio.wait_for(fut, timeout)

    def _acked(self, cid: str, stored: p.Stored) -> None:
        pending = self._pending.pop(cid, None)
        if pending is not None and not pending.future.done():
            pending.future.set_result(stored)

    def _send_failed(self, err: p.Error) -> None:
        if err.code == p.ErrorCode.INTERNAL:
            return  # stays pending: resent after ack_timeout
        pending = self._pending.pop(err.cid, None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(ClientError(err.code, err.message))

    async def _resends(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ack_timeout / 2))
            if self.state != "connected":
                continue
            now = time.monotonic()
            for pending in list(self._pending.values()):
                if now - pending.sent >= self.ack_timeout:
                    pending.sent = now
                    data = pending.data
                    self._push.submit(lambda s, d=data: s.send(d, zmq.NOBLOCK))

    # ------------------------------------------------------------ receiving

    def _tracker_for(self, room: str, head: int = 0) -> Tracker:
        tracker = self._trackers.get(room)
        if tracker is None:
            epoch, last = self._cursors.get(room, ("", -1))
            if epoch != self.epoch or last < 0:
                last = head  # a conversation from before this run: new messages only
            tracker = self._trackers[room] = Tracker(room, self.epoch, last)
        return tracker

    def _on_event(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        event = p.decode_event(frames[1])
        if isinstance(event, p.Batch):
            for msg in event.items:
                self._on_msg(msg)
        elif isinstance(event, p.Msg):
            self._on_msg(event)
        elif isinstance(event, p.Presence):
            if event.room in self._trackers:
                self._events.put_nowait(event)
        elif isinstance(event, p.Notice):
            if event.event == "shutdown" and event.boot == self.boot:
                self._set_state("reconnecting", "broker shut down")

    def _on_msg(self, event: p.Msg) -> None:
        if event.sender == self.name and event.cid in self._pending:
            self._acked(event.cid, p.Stored(event.cid, event.room, event.seq, event.id, event.ts))
        if event.epoch != self.epoch:
            return  # the heartbeat will notice the new epoch and reset
        tracker = self._trackers.get(event.room)
        if tracker is None:
            if not p.is_dm_room(event.room):
                return
            tracker = self._tracker_for(event.room)  # a new conversation: from its first message
        for msg in tracker.offer(event):
            self._events.put_nowait(msg)
        if tracker.early:
            self._wake_filler(event.room)

    def _wake_filler(self, *rooms: str) -> None:
        self._want_fill.update(rooms)
        self._fill_wake.set()

    async def _filler(self) -> None:
        """Fetch from history what trackers miss, one room at a time, within recover_limit."""
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

    async def _fill(self, room: str) -> None:
        for _ in range(100):  # bounded: each round delivers or skips something
            tracker = self._trackers.get(room)
            if tracker is None or (gap := tracker.missing()) is None:
                return
            after, before = gap
            upper = before - 1 if before else tracker.known_head
            if upper - after > self.recover_limit:  # too far behind: keep only the newest
                gap_event = tracker.skip(upper - self.recover_limit, "beyond the recovery limit")
                if gap_event is not None:
                    self._events.put_nowait(gap_event)
                after = tracker.last
            wanted = upper - after
            reply = await self._request(
                lambda rid: p.History(rid=rid, room=room, limit=min(wanted, p.MAX_HISTORY), before=before, after=after)
            )
            assert isinstance(reply, p.HistoryReply)
            if reply.epoch != tracker.epoch:
                return
            msgs = [msgspec.structs.replace(m, epoch=reply.epoch) for m in reply.messages]
            if not msgs or msgs[0].seq > after + 1:
                first_held = msgs[0].seq if msgs else (before or reply.head + 1)
                gap_event = tracker.skip(first_held - 1, "no longer in history")
                if gap_event is not None:
                    self._events.put_nowait(gap_event)
            tracker.saw_head(reply.head)
            delivered = tracker.fill(msgs, 0)
            delivered += tracker.release()
            for msg in delivered:
                self._events.put_nowait(msg)
            if delivered:
                self.recovered += len(delivered)
                self._events.put_nowait(Recovered(room, len(delivered)))
            if not msgs and tracker.missing() == gap:
                gap_event = tracker.skip(upper, "no longer in history")
                if gap_event is not None:
                    self._events.put_nowait(gap_event)
                for msg in tracker.release():
                    self._events.put_nowait(msg)
                return

    # ------------------------------------------------------------ liveness

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            self.state, self.state_since = state, time.time()
            self._events.put_nowait(StateChange(state, self.state_since, detail))

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                log.warning("handshake refused by %s (status %s)", self.broker, event["value"])
                if self._auth_failed is not None and not self._auth_failed.done():
                    self._auth_failed.set_result(event["value"])

    async def _heartbeats(self) -> None:
        """Ping every heartbeat: keeps presence alive, detects a lost broker and lost tails."""
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
                continue
            assert isinstance(pong, p.Pong)
            if pong.boot != self.boot or pong.epoch != self.epoch:
                await self._rehello()
                continue
            if self.state != "connected":
                self._set_state("connected")
                self._resend_all()
            self._saw_heads(pong.heads)

    def _saw_heads(self, heads: dict[str, int]) -> None:
        for room, head in heads.items():
            tracker = self._trackers.get(room)
            if tracker is not None and head > tracker.last:
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
        if old is not None and (old.pub_port, old.pull_port) != (welcome.pub_port, welcome.pull_port):
            self._move(self._sub, old.pub_port, welcome.pub_port)
            self._move(self._push, old.pull_port, welcome.pull_port)
        if epoch_changed:  # the new broker knows none of our rooms: join and subscribe again
            for room in [r for r in self._trackers if not p.is_dm_room(r)]:
                await self._request(lambda rid, r=room: p.Join(rid=rid, room=r))
                topic = p.room_topic(room)
                self._sub.submit(lambda s, t=topic: s.setsockopt(zmq.SUBSCRIBE, t))
        self._set_state("connected")
        self._resend_all()

    def _move(self, pump: _Pump, old: int, new: int) -> None:
        """The restarted broker listens on other ports (it was bound to port 0)."""

        def move(sock: zmq.Socket) -> None:
            sock.disconnect(f"{self.base}:{old}")
            sock.connect(f"{self.base}:{new}")

        pump.submit(move)

    def _resend_all(self) -> None:
        for pending in self._pending.values():
            pending.sent = time.monotonic()
            data = pending.data
            self._push.submit(lambda s, d=data: s.send(d, zmq.NOBLOCK))

    def _reset_epoch(self, epoch: str) -> None:
        """The broker's history was replaced: report it and start each room afresh."""
        for room, tracker in self._trackers.items():
            self._events.put_nowait(Gap(room, 1, tracker.last, "the broker's history was reset"))
            self._trackers[room] = Tracker(room, epoch, 0)
