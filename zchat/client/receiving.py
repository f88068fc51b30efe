"""The receiving side: events handed to the caller, per-room trackers (zchat.recovery)
over the fan-out, heads, and the filler that fetches gaps from history."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import msgspec

from zchat import protocol as p
from zchat.client.events import ClientError, Event, Recovered
from zchat.recovery import Tracker

log = logging.getLogger(__package__)  # one logger for the whole library: "zchat.client"

#: Lines whose ``to`` names us: an invite to a room, or our removal from it.
_ABOUT_ME = frozenset({"invite", "kick", "ban"})

#: What an event weighs in the unread queue besides a line's text (a rough size of
#: the decoded object: the bound is on memory, so text counts by its length).
EVENT_WEIGHT = 200


def weigh(events: list[Event]) -> int:
    """Roughly the memory ``events`` hold while unread (bytes)."""
    total = EVENT_WEIGHT * len(events)
    for event in events:
        text = getattr(event, "text", None)
        if text:
            total += len(text)
    return total


class Receiving:
    """Events in (a mixin of Client): ordered per room, gaps filled from history."""

    # ------------------------------------------------------------ events

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
            self._unread += weigh(events)
            if self._unread > self.unread_limit:
                self._hold_back()

    # Unread events are bounded (unread_limit bytes): past it the SUB is not read, so
    # libzmq's queue and then the broker's send queue for us fill and drop, and the
    # filler waits; once the caller has read half of it back, reading resumes and the
    # trackers fetch whatever was dropped from history. Nothing is lost, nothing grows.

    def _hold_back(self) -> None:
        if not self._reading.is_set():
            return
        self._reading.clear()
        sub = getattr(self, "_sub", None)
        if sub is not None:
            sub.pause()
        log.debug("%d bytes of events unread (bound %d): not reading the fan-out until half are read", self._unread, self.unread_limit)

    def _took(self, chunk: list[Event]) -> None:
        """The caller took ``chunk`` from the queue: resume once half the bound is free."""
        self._unread = max(0, self._unread - weigh(chunk))
        if not self._reading.is_set() and self._unread <= self.unread_limit // 2:
            self._reading.set()
            sub = getattr(self, "_sub", None)
            if sub is not None:
                sub.resume()

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
                self._took(chunk)
        if queued:
            self._hand_over(queued)
        if closed:
            self._events.put_nowait(None)

    async def events(self) -> AsyncIterator[Event]:
        """Messages (in seq order per room, no gap, no duplicate), presence, state changes."""
        while True:
            chunk = await self._events.get()
            if chunk is None:
                return
            self._took(chunk)
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
            self._took(chunk)
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
            pending = self._pending
            if pending:  # our own lines count as acked (_own, inlined: a batch is up to 256 lines)
                name, own = self.name, self._own
                for msg in items:
                    if msg.cid in pending and msg.sender == name:
                        own(msg)
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
        elif kind is p.Retopic:
            if event.room in self._subscribed:  # type: ignore[union-attr]
                self._set_token(event.room, event.token)  # type: ignore[union-attr]
                self._subscribe(event.room)  # type: ignore[union-attr]
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
        if event.to == self.name and event.kind in _ABOUT_ME:
            if event.kind != "invite":
                self._taken_out(event, tracker, out)
                return
            if tracker is None:  # an invite to a room we are not in: on our inbox
                out.append(event)
                return
        if tracker is None:
            if not p.is_dm_room(event.room):
                return
            tracker = self._tracker_for(event.room)  # a new conversation: from its first message
        out += tracker.offer(event)
        if tracker.early:
            self._wake_filler(event.room)

    def _taken_out(self, event: p.Msg, tracker: Tracker | None, out: list[Event]) -> None:
        """A kick or ban of ours (on the room's topic and again on our inbox): deliver
        it once, then stop tracking the room (its history is no longer ours to read)."""
        if tracker is None:
            if self._left.get(event.room, 0) < event.seq:
                out.append(event)  # the room's copy never came (or we were not following it)
            if event.room in self._posting:  # joined to post only: no longer a member
                self._posting.discard(event.room)
                self.joined_info.pop(event.room, None)
        else:
            out += tracker.offer(event)
            if tracker.last < event.seq:
                out.append(event)  # lines before it are lost to us: show it anyway
            self._trackers.pop(event.room, None)
            self._unsubscribe(event.room)
            self.joined_info.pop(event.room, None)
        if len(self._left) >= 1024:
            self._left.clear()
        self._left[event.room] = max(event.seq, self._left.get(event.room, 0))

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
            await self._reading.wait()  # the caller is behind: fetch more once it has read
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
