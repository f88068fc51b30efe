"""Requests and their replies: join, part, history, who, rooms, status, keys and
invites, ping; retried after rate_limited, at most MAX_IN_FLIGHT on the wire."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from zchat import protocol as p
from zchat.client.events import ClientError, Problem
from zchat.recovery import Tracker
from zchat.sockio import NOBLOCK

log = logging.getLogger(__package__)  # one logger for the whole library: "zchat.client"

#: A request refused with rate_limited is asked again after the broker's retry_after,
#: at most this many times and for at most this long in all: a short wait is a delay
#: for the caller, a long one an error it can show (with ``retry_after``).
RATE_RETRIES = 5
RATE_WAIT_MAX = 15.0
#: Most pages ``who()`` and ``rooms()`` follow (each is up to ~1 MiB).
MAX_LIST_PAGES = 200
#: Requests a client has on the wire at once (the broker's ROUTER queues 16 replies a
#: connection by default; acks and errors share that queue).
MAX_IN_FLIGHT = 8


class Requests:
    """Requests to the broker (a mixin of Client)."""

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

    async def join(self, room: str, history: int = 0, private: bool = False, *, receive: bool = True) -> list[p.Member]:
        """Join ``room`` and start receiving it: ``history`` earlier messages first, then live.
        With ``private``, create it as a private room (you become its operator; refused
        if it exists).

        With a cursor from an earlier run, everything after it is delivered instead (up to
        ``recover_limit``).

        ``receive=False`` joins to post only (a bot, ``zchat send``, a CI notifier): the
        client is a member (it may send, it is listed, it is rejoined after a broker
        restart) but does not subscribe to the room, so none of its lines, presence or
        gaps reach it, and posting costs no decoding of the room's traffic. Its own
        sends are still acked; kicks and invites still come on its inbox. Joining
        again with ``receive=True`` starts receiving (new lines only, unless
        ``history``); a room being received stops being received.
        """
        joined = await self._request(lambda rid: p.Join(rid=rid, room=room, private=private))
        assert isinstance(joined, p.Joined)
        self.joined_info[room] = joined
        self._left.pop(room, None)
        self._set_token(room, joined.token)
        if not receive:
            self._posting.add(room)
            if self._trackers.pop(room, None) is not None:
                self._unsubscribe(room)
            return joined.members
        self._posting.discard(room)
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
        self.joined_info.pop(room, None)
        self._posting.discard(room)
        if tracker is not None and p.is_dm_room(room):
            self._cursors[room] = (tracker.epoch, tracker.last)
        self._catch_up.discard(room)
        self._rejoin.discard(room)
        self._unsubscribe(room)

    def _subscribe(self, room: str, again: bool = False) -> None:
        """Subscribe to a room once: SUB counts subscriptions, so a second SUBSCRIBE would
        need a second UNSUBSCRIBE. ``again`` re-sends it (unsubscribe, subscribe) for a
        broker that refused it before the room was joined again. A room whose wire topic
        changed (its token) moves to the new topic; the broker's Heads then tells what to
        fetch of what was published in between."""
        if p.is_dm_room(room):
            return  # DM conversations come on the inbox topic
        topic = p.room_topic(room, self._tokens.get(room, ""))
        held = self._subscribed.get(room)
        if held is not None:
            if held != topic:
                self._subscribed[room] = topic
                self._sub.submit(lambda s: (s.setsockopt(zmq.UNSUBSCRIBE, held), s.setsockopt(zmq.SUBSCRIBE, topic)))
            elif again:
                self._sub.submit(lambda s: (s.setsockopt(zmq.UNSUBSCRIBE, topic), s.setsockopt(zmq.SUBSCRIBE, topic)))
            return
        self._subscribed[room] = topic
        self._sub.submit(lambda s: s.setsockopt(zmq.SUBSCRIBE, topic))

    def _unsubscribe(self, room: str) -> None:
        topic = self._subscribed.pop(room, None)
        self._tokens.pop(room, None)
        if topic is not None:
            self._sub.submit(lambda s: s.setsockopt(zmq.UNSUBSCRIBE, topic))

    def _set_token(self, room: str, token: str) -> None:
        if token:
            self._tokens[room] = token
        else:
            self._tokens.pop(room, None)

    def _saw_tokens(self, tokens: dict[str, str]) -> None:
        """Tokens from a Welcome or a Pong (a Retopic lost on the way is caught here)."""
        for room, token in tokens.items():
            if room in self._subscribed and self._tokens.get(room, "") != token:
                self._set_token(room, token)
                self._subscribe(room)

    # ------------------------------------------------------------ moderation

    async def _moderate(self, room: str, action: str, name: str = "", text: str = "") -> None:
        """One operator action (protocol.Moderate); a non-operator's is ClientError forbidden."""
        await self._request(lambda rid: p.Moderate(rid=rid, room=room, action=action, name=name, text=text))  # type: ignore[arg-type]

    async def invite(self, room: str, name: str) -> None:
        """Invite ``name`` to ``room`` (an operator's action): a private room admits them at once."""
        await self._moderate(room, "invite", name)

    async def kick(self, room: str, name: str, reason: str = "") -> None:
        """Remove ``name`` from ``room``; they may join again (not a private room, uninvited)."""
        await self._moderate(room, "kick", name, reason)

    async def ban(self, room: str, name: str, reason: str = "") -> None:
        """Remove ``name`` from ``room`` and refuse their joins until unbanned."""
        await self._moderate(room, "ban", name, reason)

    async def unban(self, room: str, name: str) -> None:
        """Lift ``name``'s ban from ``room`` (a private room still wants an invite)."""
        await self._moderate(room, "unban", name)

    async def set_topic(self, room: str, text: str) -> None:
        """Set ``room``'s topic ('' clears it)."""
        await self._moderate(room, "topic", text=text)

    async def op(self, room: str, name: str) -> None:
        """Make member ``name`` an operator of ``room``."""
        await self._moderate(room, "op", name)

    async def deop(self, room: str, name: str) -> None:
        """Take operator status from ``name`` in ``room``."""
        await self._moderate(room, "deop", name)

    async def _admin(self, action: str, name: str = "", room: str = "", seq: int = 0) -> None:
        """One broker admin action (protocol.Admin); a non-admin's is ClientError forbidden."""
        await self._request(lambda rid: p.Admin(rid=rid, action=action, name=name, room=room, seq=seq))  # type: ignore[arg-type]

    async def admin_ban(self, name: str) -> None:
        """(Broker admins) refuse ``name`` at every handshake from now on; its live sessions end."""
        await self._admin("ban", name)

    async def admin_unban(self, name: str) -> None:
        """(Broker admins) lift a broker ban: ``name`` may connect again."""
        await self._admin("unban", name)

    async def delete(self, room: str, seq: int) -> None:
        """(Broker admins) replace line ``seq`` of ``room`` by a tombstone; clients hide it."""
        await self._admin("delete", room=room, seq=seq)

    async def edit(self, room: str, seq: int, text: str) -> None:
        """Change your own text or /me line ``seq`` of ``room`` (a DM conversation too:
        its ``@a:b`` room) to ``text``; every client sees an ``edit`` line (ref = seq), and
        history gives the line with the new text, ``edited`` set. Someone else's line:
        ClientError ``forbidden``."""
        await self._request(lambda rid: p.Edit(rid=rid, room=room, seq=seq, text=text))

    async def delete_own(self, room: str, seq: int) -> None:
        """Delete your own text or /me line ``seq`` of ``room``: a ``delete`` line (ref =
        seq) and a tombstone in history, as a broker admin's delete. Someone else's
        line: ClientError ``forbidden``."""
        await self._request(lambda rid: p.Delete(rid=rid, room=room, seq=seq))

    async def release(self, name: str) -> None:
        """(Broker admins) free the name ``name``: out of every room, its keys forgotten."""
        await self._admin("release", name)

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

    async def search(self, text: str, room: str = "", limit: int = 50, before: int = 0) -> tuple[list[p.Msg], int]:
        """Text and /me lines holding every word of ``text`` (``word*``: a prefix), in
        ``room`` or every room this user may read, newest first: up to ``limit`` of them
        (pages the broker cut are asked for again, up to MAX_LIST_PAGES), and the
        ``before`` of the next page (0: nothing more matches). A Redis broker raises
        ClientError ``not_supported``."""
        out: list[p.Msg] = []
        for _ in range(MAX_LIST_PAGES):
            want = min(limit - len(out), p.MAX_SEARCH)
            reply = await self._request(lambda rid: p.Search(rid=rid, text=text, room=room, limit=want, before=before))
            assert isinstance(reply, p.SearchReply)
            out += [msgspec.structs.replace(m, epoch=reply.epoch) for m in reply.messages]
            before = reply.next
            if not before or len(out) >= limit:
                break
        return out, before

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
        if type(reply) is p.Ack:
            acked = self._acked
            for stored in reply.stored:
                acked(stored.cid, stored)
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
