"""The loop's inputs, each drained in bounded turns (BATCH frames, and BATCH_BYTES /
TURN_BYTES bytes for requests and chat lines): subscriptions on the XPUB, requests on
the ROUTER, chat lines on the PULL. Requests and chat lines are read ahead into a
bounded queue per input and taken from it fairly by sender (zchat.broker.fair)."""

from __future__ import annotations

import logging
from typing import Callable

import zmq

from zchat import protocol as p
from zchat.broker.constants import BATCH, EDGE_REQUESTS
from zchat.broker.fair import FairQueue
from zchat.core import Outcome
from zchat.sockio import NOBLOCK, send_parts, take

log = logging.getLogger(__package__)  # one logger for the whole broker: "zchat.broker"

#: Beside BATCH, the bytes of frames one input (requests, chat lines) takes in a turn,
#: and all inputs together: a turn stores and publishes what it took, so 128 lines of
#: 32 KB (4 MB) made one turn of 50-70 ms (storing them alone: 28 ms of CPU, most of it
#: indexing the text); 96 KiB is about 1 ms. An input stops once past its budget, so a
#: turn holds at most TURN_BYTES plus one frame (up to 2 x max_bytes); TURN_BYTES above
#: BATCH_BYTES leaves the second input (chat lines) at least a frame.
BATCH_BYTES = 64 * 1024
TURN_BYTES = 96 * 1024

#: Reading ahead (zchat.broker.fair): each input reads freely until it holds
#: READ_AHEAD_BYTES (or READ_AHEAD_FRAMES) of frames read but not yet taken, at most
#: READ_FRAMES a turn, and never past twice that (FairQueue.full). A normal user's
#: request is read, and served, in the turn after it came rather than after everything
#: queued ahead of it. QUANTUM is the bytes a sender that keeps a queue is credited a
#: round.
READ_AHEAD_BYTES = 4 * 1024 * 1024
READ_AHEAD_FRAMES = 4096
READ_FRAMES = 4 * BATCH
QUANTUM = 8 * 1024

#: Once an input's queue is past its bound, it still reads up to OVER_READS frames a
#: turn (about 30 us each to refuse): a flood holds the queue full, and a normal user's
#: request, one of the next few frames libzmq hands over (one a connection in turn), is
#: still read and taken at once. With others waiting, a flooding sender over its share
#: is refused rate_limited, retry after SHED_RETRY seconds, until its queue empties; a
#: sender alone in the queue is held back instead (libzmq's queue, then TCP).
OVER_READS = 32
SHED_RETRY = 0.25

#: What a read-ahead queue holds: the frames, their sender (User-Id) and their bytes.
Taken = tuple[list[zmq.Frame], str, int]


def read_ahead_queue() -> FairQueue[Taken]:
    """One input's read-ahead queue, with the bounds above."""
    return FairQueue(QUANTUM, READ_AHEAD_BYTES, READ_AHEAD_FRAMES)


#: A frame that made no work (refused: rate limited, malformed, too many items) is
#: charged this share of its bytes against the turn's budget: refusing a 32 KB line
#: took about 70 us here, storing and publishing it 300. Charged in full, a flood's
#: refused lines went three to a turn and held everyone behind them.
REFUSED_SHARE = 4


def charge(size: int, worked: bool) -> int:
    """The bytes a frame of ``size`` costs the turn: all of them if it made work to
    store, publish or query; a share if it was refused."""
    return size if worked else size // REFUSED_SHARE


def _work(out: Outcome) -> int:
    """How much storing, publishing and querying ``out`` holds (to tell refused frames)."""
    return len(out.store) + len(out.publish) + len(out.queries)


class Inputs:
    """Reading the sockets (a mixin of Broker): each input taken in a bounded turn."""

    # ------------------------------------------------------------ inputs

    turn_bytes = 0  # bytes of request and chat frames taken this turn (the loop resets it)
    request_queue: FairQueue[Taken]  # frames read ahead from the ROUTER (Broker.__init__)
    chat_queue: FairQueue[Taken]  # and from the PULL

    def _took(self, size: int) -> None:
        """Count ``size`` bytes taken this turn (and the most a turn ever took, in Stats)."""
        self.turn_bytes += size
        self.stats.turn_bytes_max = max(self.stats.turn_bytes_max, self.turn_bytes)

    def _room_for(self, mine: int) -> bool:
        """Whether an input that took ``mine`` bytes this turn may take another frame:
        a turn stores and publishes all it took, so its bytes bound everyone's wait."""
        return mine < BATCH_BYTES and self.turn_bytes < TURN_BYTES

    def _subscriptions(self, now: float) -> None:
        core = self.core
        assert core is not None
        for _ in range(BATCH):
            try:
                frame = self.xpub.recv(NOBLOCK, copy=False)
            except zmq.Again:
                return
            data = frame.bytes
            if not data:
                continue
            topic = data[1:]
            if data[0] == 0:
                self.xpub.setsockopt(zmq.UNSUBSCRIBE, topic)
                continue
            try:
                user = frame.get("User-Id")
            except zmq.ZMQError:  # the peer is gone already: its frame has no metadata left
                continue
            if data[0] == 1 and not self.insecure_plaintext:
                self._note_connection("fan-out", frame)
            if data[0] == 1 and core.may_subscribe(user, topic):
                self.xpub.setsockopt(zmq.SUBSCRIBE, topic)
                # What was published before this took effect never reached the client:
                # tell it the heads now (on its inbox, in force before any room of its).
                heads = core.subscribed(user, topic)
                if heads is not None:
                    send_parts(self.xpub, [p.inbox_topic(user), p.encode(heads)])
            else:
                core.count("bad_subscription")
                self.bad.warn("subscription", f"{user} may not subscribe to {topic[:80]!r}", now)
        self.more_input = True  # stopped at BATCH, not at an empty queue

    def _read_ahead(self, sock: zmq.Socket, queue: FairQueue[Taken], now: float, out: Outcome) -> None:
        """Read what ``sock`` (just found readable) has queued into ``queue``, each frame
        under its sender, until the socket is empty or READ_FRAMES were read this turn.
        Past the queue's bound, a frame is queued only if its sender is within its
        share (FairQueue.admit) and refused otherwise (_shed); OVER_READS such frames
        (read while full, or refused) end the turn's reading."""
        n = over = 0
        while n < READ_FRAMES and over < OVER_READS and not queue.full():
            full = not queue.room()
            try:
                frames = take(sock, n)
            except zmq.Again:
                break
            n += 1
            try:
                user = frames[-1].get("User-Id")
            except zmq.ZMQError:  # no metadata (the peer is gone): a sender of its own
                user = ""
            size = sum(len(f) for f in frames)
            if queue.admit(user, size):
                queue.put(user, size, (frames, user, size))
                over += full
            else:
                over += 1
                self._shed(frames, user, now, out)
        self.stats.backlog_bytes_max = max(self.stats.backlog_bytes_max, queue.bytes)

    def _shed(self, frames: list[zmq.Frame], user: str, now: float, out: Outcome) -> None:
        """Refuse a frame read past the full queue from a sender over its share: each
        request and line in it is answered rate_limited (retry after SHED_RETRY), so
        the sender learns at once."""
        core = self.core
        assert core is not None
        core.count("shed")
        message = f"the broker is busy with your earlier frames: try again in {SHED_RETRY:.2f}s"

        def refuse(sid: str, rid: int = 0, cid: str = "") -> None:
            # Weighing nothing: a client cannot help the frames it had in flight when
            # the broker got busy (a bulk sender would be cut for them otherwise).
            err = p.Error(code=p.ErrorCode.RATE_LIMITED, message=message, rid=rid, cid=cid, retry_after=SHED_RETRY)
            out.weigh(err, 0.0)
            out.replies.append((sid, err))

        if len(frames) == 2:  # ROUTER: the session it came on is its routing id
            sid = frames[0].bytes.decode("latin-1")
            try:
                req = p.decode_router(frames[1].bytes, self.limits.max_bytes)
            except p.ProtocolError as exc:
                out.error(sid, exc.code, exc.message, rid=exc.rid, cid=exc.cid)
                return
            kind = type(req)
            if kind is p.Send or kind is p.Sends:
                for msg in [req] if kind is p.Send else req.items:  # type: ignore[union-attr]
                    refuse(sid, cid=msg.cid[: p.MAX_CID_LEN])
            else:
                refuse(sid, rid=req.rid)  # type: ignore[union-attr]
            return
        try:  # PULL: each line names its sender's session
            msgs, _ = p.decode_sends(frames[0].bytes, self.limits.max_bytes)
        except p.ProtocolError:
            return
        for msg in msgs:
            session = core.sessions.get(msg.sid)
            if session is not None and session.name == user:
                refuse(msg.sid, cid=msg.cid)

    def _requests(self, now: float, out: Outcome, fresh: bool = True) -> int:
        """Read ahead what the ROUTER holds (requests and chat frames sent over the
        DEALER) if ``fresh`` (found readable), then take from what was read, fairly,
        until about BATCH requests and lines, or about BATCH_BYTES, were taken; return
        how many frames."""
        return self._take_fairly(self.router, self.request_queue, self._request, fresh, now, out)

    def _take_fairly(
        self, sock: zmq.Socket, queue: FairQueue[Taken], handle: Callable[[list[zmq.Frame], str, float, Outcome], int],
        fresh: bool, now: float, out: Outcome,
    ) -> int:
        """One input's turn: read ahead if ``fresh``, then hand frames to ``handle`` in
        fair order until BATCH requests and lines (what ``handle`` returns) or the byte
        budget were taken; return how many frames."""
        if fresh:
            self._read_ahead(sock, queue, now, out)
        count = taken = mine = 0
        while taken < BATCH and self._room_for(mine):
            item = queue.pop()
            if item is None:
                return count
            frames, user, size = item
            count += 1
            work = _work(out)
            taken += handle(frames, user, now, out)
            cost = charge(size, _work(out) > work)
            mine += cost
            self._took(cost)
        self.more_input = True  # stopped at a budget, not at an empty queue
        return count

    def _request(self, frames: list[zmq.Frame], user: str, now: float, out: Outcome) -> int:
        """Handle one ROUTER message (a request, or chat lines sent over the DEALER);
        return how many requests and lines it held."""
        core = self.core
        assert core is not None
        sid = frames[0].bytes.decode("latin-1")
        if len(frames) != 2:
            core.count("bad_frame")
            out.error(sid, p.ErrorCode.BAD_FRAME, f"expected 1 body frame, got {len(frames) - 1}")
            return 1
        if self.barred and self._barred(frames[1], now):
            return 1  # a revoked or cooling-off key's frame: dropped, its connection cut
        if not user:  # no metadata left (the peer is gone): nobody to answer
            return 1
        data = frames[1].bytes
        try:
            req = p.decode_router(data, self.limits.max_bytes)
        except p.ProtocolError as exc:
            if exc.code != p.ErrorCode.TOO_LARGE:
                try:  # a sound sends frame with some bad lines: take the good ones
                    msgs, bad = p.decode_sends(data, self.limits.max_bytes)
                except p.ProtocolError:
                    pass
                else:
                    self._take(user, msgs, bad, now, out, sid)
                    return max(1, len(msgs) + len(bad))
            core.count(exc.code)
            self.bad.warn(exc.code, exc.message, now)
            out.error(sid, exc.code, exc.message, rid=exc.rid, cid=exc.cid)
            return 1
        kind = type(req)
        if kind in EDGE_REQUESTS:  # the broker's, not the core's: keys and names are the edge's
            self._edge_request(sid, frames[1], req, now, out)
            return 1
        if kind is p.Hello and not self.insecure_plaintext:
            self._note_connection("requests", frames[1])
        if kind is p.Send or kind is p.Sends:
            lines = [req] if kind is p.Send else req.items  # type: ignore[union-attr]
            self._take(user, lines, [], now, out, sid)  # type: ignore[arg-type]
            return max(1, len(lines))
        if kind is p.Hello and sid not in core.sessions:
            # Session ids stay out of INFO logs: whoever reads the log must not get a route.
            log.info("%s connected (%s)", user, req.client[:40] or "unknown client")  # type: ignore[union-attr]
            log.debug("session %s is %s", sid, user)
        elif kind is p.Bye:
            log.info("%s said goodbye", user)
        self._seen_on(sid, frames[1])  # its session ends with this connection
        try:
            core.request(sid, user, req, now, out)  # type: ignore[arg-type]
        except Exception:  # a bug met by one request costs that request only
            self._failed("a request", now)
            out.error(sid, p.ErrorCode.INTERNAL, "the broker failed to handle this request", rid=req.rid)  # type: ignore[union-attr]
        return 1

    def _chat(self, now: float, out: Outcome, fresh: bool = True) -> int:
        """Read ahead what the PULL holds, then take from it, fairly, until about BATCH
        chat lines, or about BATCH_BYTES (what the turn has left of TURN_BYTES), were
        taken; return how many frames."""
        return self._take_fairly(self.pull, self.chat_queue, self._pulled_frame, fresh, now, out)

    def _pulled_frame(self, frames: list[zmq.Frame], user: str, now: float, out: Outcome) -> int:
        """Handle one PULL message; return how many lines it held."""
        if len(frames) != 1:
            self.core.count("bad_frame")  # type: ignore[union-attr]
            self.bad.warn("bad_frame", f"chat line with {len(frames)} frames", now)
            return 1
        frame = frames[0]
        if not self.insecure_plaintext and not self._pulled(frame, now):
            return 1
        return self._lines(user, frame.bytes, now, out)

    def _lines(self, user: str, data: bytes, now: float, out: Outcome) -> int:
        """Decode a PULLed ``send``/``sends`` body and take its lines; return how many."""
        try:
            msgs, bad = p.decode_sends(data, self.limits.max_bytes)
        except p.ProtocolError as exc:
            msgs, bad = [], [exc]
        self._take(user, msgs, bad, now, out)
        return max(1, len(msgs) + len(bad))

    def _take(self, user: str, msgs: list[p.Send], bad: list[p.ProtocolError], now: float, out: Outcome, via: str = "") -> None:
        """Hand good lines to the core; bad ones get an error at the sender's own session.

        ``via`` is the DEALER session the frame came in on (empty for PULL): a line
        sent there must name that session in its ``sid``.
        """
        core = self.core
        assert core is not None
        self.stats.received += len(msgs) + len(bad)
        for exc in bad:
            core.count(exc.code)
            self.bad.warn(exc.code, exc.message, now)
            sid = via or exc.sid
            session = core.sessions.get(sid)
            if session is not None and session.name == user:
                out.error(sid, exc.code, exc.message, cid=exc.cid)  # the sender's own session
        if len(msgs) + len(bad) > 1:
            core.count("packed_frames")
        send = core.send
        for msg in msgs:
            if via and msg.sid != via:
                core.count("bad_sid")
                out.error(via, p.ErrorCode.BAD_REQUEST, "sid must be this DEALER's routing id", cid=msg.cid[: p.MAX_CID_LEN])
                continue
            send(user, msg, now, out)
