"""The connection: sockets and the CURVE handshake, dial, redial and hang-up, and
liveness (heartbeats, the monitor, hello again after a broker restart, re-joining)."""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from zchat import protocol as p
from zchat.client.events import (
    AuthError,
    BrokerKeyError,
    ClientError,
    ConnectError,
    Problem,
    StateChange,
)
from zchat.client.pump import _Pump
from zchat.recovery import Gap, Tracker
from zchat.sockio import close_monitored

log = logging.getLogger(__package__)  # one logger for the whole library: "zchat.client"

#: Seconds between attempts to re-join rooms a restarted broker refused or did not answer.
REJOIN_RETRY = 5.0
#: Refusals worth trying again later (the others are final: the room is dropped).
_TRANSIENT = frozenset({p.ErrorCode.RATE_LIMITED, p.ErrorCode.INTERNAL, p.ErrorCode.NO_SESSION, p.ErrorCode.SHUTTING_DOWN, p.ErrorCode.STORAGE_UNAVAILABLE})
#: Unanswered pings in a row after which the client connects again as a new session.
REDIAL_AFTER = 3
#: Longest wait for a pong (seconds; shorter with a shorter heartbeat). A pong takes
#: milliseconds; waiting a whole heartbeat for one made a vanished broker seen late.
PING_TIMEOUT = 10.0  # (a lazy ping's pong is given a second more: the broker's tick)
#: Each wait between pings is the heartbeat times a random factor in this range (the
#: first after connecting in FIRST_JITTER): clients that connected together (a broker
#: restart, a bench) do not ping together ever after. The mean stays one heartbeat, and
#: the longest gap, 1.2 heartbeats plus a ping's timeout, stays inside the broker's
#: presence timeout (3 heartbeats).
JITTER = (0.8, 1.2)
FIRST_JITTER = (0.2, 1.2)
#: With a heartbeat of at least ALIGN_FROM seconds, a ping leaves at a whole ALIGN
#: seconds of the wall clock: the pings of one second (a heartbeat's 1/120th of the
#: clients, spread over the heartbeat by the jitter) reach the broker together, and it
#: reads them in a few turns instead of waking once for each. Measured: a lone ping
#: costs the broker two to three times what one of a bunch costs (docs/performance.md).
ALIGN = 1.0
ALIGN_FROM = 10.0


def aligned(wait: float, now: float) -> float:
    """``wait`` stretched to end at the next whole ALIGN seconds of the wall clock ``now``."""
    end = now + wait
    return wait + (-end) % ALIGN


def split_broker(address: str) -> tuple[str, int]:
    base, _, port = address.rpartition(":")
    if not address.startswith("tcp://") or not port.isdigit() or not base[len("tcp://"):]:
        raise ValueError(f"broker address must look like tcp://HOST:PORT, got {address!r}")
    return base, int(port)


def split_addresses(addresses: str) -> list[str]:
    """``tcp://a:5555#k=K1,tcp://b:5555`` -> each address (checked), in order."""
    from zchat import keys

    out = []
    for address in addresses.split(","):
        address = address.strip()
        endpoint, _ = keys.split_address(address)
        split_broker(endpoint)
        out.append(address)
    if not out:
        raise ValueError("no broker address given")
    return out


class Connection:
    """Connecting and staying connected (a mixin of Client)."""

    def _use(self, at: int) -> None:
        """Talk to the ``at``-th of the broker addresses from now on (its key is learnt
        at the next dial)."""
        from zchat import keys

        self._at = at % len(self.addresses)
        self.address = self.addresses[self._at]
        self.broker, given = keys.split_address(self.address)
        self.base, _ = split_broker(self.broker)
        # CURVE unless a broker in this very process was started in its test-only plaintext
        # mode there; an address that names a key means CURVE whatever was declared.
        self.plaintext = given is None and keys.is_insecure(self.broker)
        self.server_key = None

    async def _learn_key(self, timeout: float = 2.0) -> None:
        """The broker's key, from the address or the pins (BrokerKeyError if unknown);
        a silent key endpoint is asked again until ``timeout``."""
        if not self.plaintext and self.server_key is None:
            from zchat import keys

            try:
                _, self.server_key = await keys.broker_key(self.address, self._ctx, self.trust_new_broker, timeout)
            except keys.KeyError_ as exc:
                raise BrokerKeyError("broker_key", str(exc)) from None

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
        nothing but the plain key request was sent). Given several addresses, a silent
        broker is passed over for the next (ConnectError when none answered)."""
        for tried in range(len(self.addresses)):
            try:
                return await self._connect_here(timeout)
            except ConnectError as exc:
                if tried == len(self.addresses) - 1:
                    await self.close()
                    raise
                log.info("%s; trying %s", exc.message, self.addresses[(self._at + 1) % len(self.addresses)])
                self._hang_up()
                self._use(self._at + 1)
            except BaseException:
                await self.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connect_here(self, timeout: float) -> p.Welcome:
        await self._learn_key(timeout)
        welcome = await self._hello(timeout)
        if welcome.name == p.LOOKER and not self.looking:
            welcome = await self._claim(timeout)
        self._take_welcome(welcome)
        self._auth_failed = None  # a refusal from now on (a revoked key) closes the client: see _watch
        self._open_sub(welcome.pub_port)
        self._beat = asyncio.Event()  # set: ping now (the DEALER's connection ended)
        self._spawn(self._heartbeats(), self._resends(), self._filler())
        self._set_state("connected")
        return welcome

    def _open_sub(self, pub_port: int) -> None:
        """A SUB on this broker's fan-out with our inbox, the system topic and every
        room we follow (after a failover: the old broker's SUB is closed first)."""
        old = getattr(self, "_sub_task", None)
        if old is not None:
            self._sub.stop()
            old.cancel()
            self._tasks.remove(old)
            self._sub_sock.close(linger=0)
            self._socks.remove(self._sub_sock)
        sub = self._sub_sock = self._socket(zmq.SUB)
        sub.rcvhwm = self.sub_hwm
        sub.connect(f"{self.base}:{pub_port}")
        self._sub_at = (self.base, pub_port, self.server_key)
        self._sub = _Pump(sub, self._on_event)
        if not self._reading.is_set():  # the caller is still behind: the new SUB waits too
            self._sub.pause()
        topics = [p.SYSTEM_TOPIC] if self.looking else [p.SYSTEM_TOPIC, p.inbox_topic(self.name)]
        topics += [p.room_topic(room) for room in sorted(self._subscribed)]
        for topic in topics:
            self._sub.submit(lambda s, t=topic: s.setsockopt(zmq.SUBSCRIBE, t))
        self._sub_task = asyncio.ensure_future(self._sub.run())
        self._tasks.append(self._sub_task)

    async def _hello(self, timeout: float) -> p.Welcome:
        """Dial the DEALER and say hello on it; close everything and raise on refusal or silence."""
        loop = asyncio.get_running_loop()
        self._auth_failed = loop.create_future()
        self._dial()
        hello = asyncio.ensure_future(self._request(lambda rid: p.Hello(rid=rid, client=self.label), timeout=None))
        done, _ = await asyncio.wait({hello, self._auth_failed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._auth_failed in done or hello not in done:
            hello.cancel()  # connect() closes the client, or hangs up and tries the next address
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
            await self._request(lambda rid: p.Claim(rid=rid, name=self.name, secret=proof, invite=self.invite_code), timeout=timeout)
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
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED,
            addr=f"inproc://zchat-client-monitor-{secrets.token_hex(8)}",
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
        close_monitored(dealer, monitor)
        self._socks.remove(dealer)
        self._socks.remove(monitor)
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
        self._readdress()
        self._dial()

    def _readdress(self) -> None:
        """Unacked sends name the new session (a line must name its DEALER's session)."""
        for pending in self._pending.values():
            pending.data = p.encode(msgspec.structs.replace(p.decode_send(pending.data, 0), sid=self.sid))
        self._outbox.clear()  # all of it is pending: resent after the hello

    async def _fail_over(self) -> None:
        """Pings went unanswered: move to the next broker of the set, as a new session.
        The rooms, trackers and unacked sends stay: the next hello finds the same epoch
        (one Redis), the trackers fill what was missed from its history, and resends
        keep their cids, so the store's dedup acks a line the lost broker had stored."""
        lost = self.broker
        previous = (self._at, self.address, self.broker, self.base, self.plaintext, self.server_key)
        self._use(self._at + 1)
        try:
            await self._learn_key()
        except BrokerKeyError as exc:
            log.warning("cannot move to %s: %s", self.broker, exc.message)
            self._at, self.address, self.broker, self.base, self.plaintext, self.server_key = previous
            self._at = (self._at + 1) % len(self.addresses)  # the one after it, next time
            return
        log.info("no answer from %s: moving to %s", lost, self.broker)
        self._redial()

    def _take_welcome(self, welcome: p.Welcome) -> None:
        # At the first hello a DM conversation we do not track is from before this run:
        # new messages only. At a later one (a broker restart) it began while we ran.
        again = self.welcome is not None
        self.welcome = welcome
        self.boot, self.heartbeat, self.max_bytes = welcome.boot, welcome.heartbeat, welcome.max_bytes
        if self.epoch and welcome.epoch != self.epoch:
            self._reset_epoch(welcome.epoch)
        self.epoch = welcome.epoch
        self._saw_tokens(welcome.tokens)
        for room, head in welcome.rooms.items():
            if p.is_dm_room(room):
                tracker = self._tracker_for(room, 0 if again else head)
                tracker.saw_head(head)
            elif room in self._trackers:
                self._trackers[room].saw_head(head)
        self._wake_filler(*self._trackers)

    # ------------------------------------------------------------ liveness

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            self.state, self.state_since = state, time.time()
            self._emit(StateChange(state, self.state_since, detail))

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        handshakes = 0
        pinging: asyncio.Future | None = None  # one at a time: bounded however often it reconnects
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                handshakes += 1
                # The DEALER reconnected by itself: the broker closed our session when the
                # old connection ended (or restarted). Ask now, not at the next heartbeat:
                # no_session says hello again, a new boot is seen.
                if handshakes > 1 and self.state != "closed" and (pinging is None or pinging.done()):
                    pinging = asyncio.ensure_future(self._ping_quietly())
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                # The broker's process ended (or cut us): say so now, not a heartbeat later,
                # and ping every second until it answers (a vanished machine: the ping's
                # timeout tells, as before).
                if self.state == "connected":
                    self._set_state("reconnecting", "connection to the broker lost")
                    beat = getattr(self, "_beat", None)
                    if beat is not None:
                        beat.set()
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                log.warning("handshake refused by %s (status %s)", self.broker, event["value"])
                if self._auth_failed is not None and not self._auth_failed.done():
                    self._auth_failed.set_result(event["value"])
                elif self.state != "closed" and not self.plaintext:  # refused after we were in: revoked
                    asyncio.ensure_future(self._refused_later())

    def _ping_timeout(self) -> float:
        return max(1.0, min(self.heartbeat, PING_TIMEOUT))

    async def _ping_quietly(self) -> None:
        try:
            pong = await self._request(lambda rid: p.Ping(rid=rid), timeout=self._ping_timeout())
        except (ClientError, asyncio.TimeoutError):
            return  # the heartbeat carries on from here
        if isinstance(pong, p.Pong) and (pong.boot != self.boot or pong.epoch != self.epoch):
            await self._rehello()

    async def _heartbeats(self) -> None:
        """Ping about every heartbeat (JITTER): keeps presence alive, detects a lost broker
        and lost tails."""
        unanswered = 0  # pings in a row with no answer
        jitter = FIRST_JITTER
        beat = self._beat
        while True:
            if self.state == "connected":
                wait = self.heartbeat * random.uniform(*jitter)
                jitter = JITTER
                if self.heartbeat >= ALIGN_FROM:
                    wait = aligned(wait, time.time())
            else:
                wait = min(1.0, self.heartbeat)
                jitter = FIRST_JITTER  # back to connected: a new phase, not everyone's
            if not beat.is_set():
                try:
                    await asyncio.wait_for(beat.wait(), wait)
                except TimeoutError:
                    pass
            beat.clear()
            # Lazy while all is well: the broker may send the pong with others at its next
            # tick (at most a second later); eager while reconnecting, to be back at once.
            lazy = self.state == "connected"
            try:
                pong = await self._request(lambda rid: p.Ping(rid=rid, lazy=lazy), timeout=self._ping_timeout() + lazy)
            except ClientError as exc:  # no_session: _on_reply already says hello again
                if exc.code != p.ErrorCode.NO_SESSION:
                    self._set_state("reconnecting", exc.message)
                continue
            except asyncio.TimeoutError:
                self._set_state("reconnecting", "broker not answering")
                unanswered += 1
                if unanswered % REDIAL_AFTER == 0:
                    if len(self.addresses) > 1:
                        await self._fail_over()
                    else:
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
            self._saw_tokens(pong.tokens)
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
            if not hasattr(self, "_sub_at"):
                return  # connect() has not opened the fan-out yet: its own hello is the one that counts
            try:
                await self._hello_again()
            except (ClientError, asyncio.TimeoutError) as exc:
                log.info("hello again failed (%s); the next heartbeat retries", exc)

    async def _hello_again(self) -> None:
        welcome = await self._request(lambda rid: p.Hello(rid=rid, client=self.label))
        assert isinstance(welcome, p.Welcome)
        if welcome.name == p.LOOKER and not self.looking:  # another broker that has not seen our key
            welcome = await self._claim(5.0)  # a new session
            self._readdress()
        epoch_changed = welcome.epoch != self.epoch
        old = self.welcome
        self._take_welcome(welcome)
        if self._sub_at[0] != self.base or self._sub_at[2] != self.server_key:  # another broker of the set
            self._open_sub(welcome.pub_port)
        elif old is not None and old.pub_port != welcome.pub_port:
            self._move(self._sub, old.pub_port, welcome.pub_port)
            self._sub_at = (self.base, welcome.pub_port, self.server_key)
        if epoch_changed:  # the new broker knows none of our rooms: join and subscribe again
            await self._rejoin_rooms([r for r in self._trackers if not p.is_dm_room(r)] + sorted(self._posting))
        self._set_state("connected")
        self._resend_all()

    async def _rejoin_rooms(self, rooms: list[str]) -> None:
        """Join each room again; one that fails does not stop the others. Transient
        failures are retried from the heartbeat (every REJOIN_RETRY seconds), final
        refusals drop the room with a Problem event."""
        for room in rooms:
            if room not in self._trackers and room not in self._posting:
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
                self._posting.discard(room)
                self._unsubscribe(room)
                self._emit(Problem(exc.code, f"could not rejoin #{room}: {exc.message}"))
                continue
            assert isinstance(joined, p.Joined)
            self._rejoin.discard(room)
            self._set_token(room, joined.token)
            if room in self._posting:
                continue  # joined to post only: no subscription
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
