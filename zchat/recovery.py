"""Per-room ordering on the client side, sans I/O (the ZeroMQ Guide's Clone pattern).

Live messages arrive on SUB and may be missing (PUB drops for slow subscribers, a
subscription takes effect late) or repeat what history already gave. A Tracker
delivers each seq exactly once, in order, buffers what arrives early, and says which
range to fetch from history; the client library does the fetching.
"""

from __future__ import annotations

import dataclasses

from zchat.protocol import Msg

MAX_BUFFER = 10_000


@dataclasses.dataclass(frozen=True)
class Gap:
    """Messages ``first..last`` of ``room`` could not be recovered (trimmed, too old, reset)."""

    room: str
    first: int
    last: int
    reason: str


class Tracker:
    def __init__(self, room: str, epoch: str, last: int) -> None:
        self.room = room
        self.epoch = epoch
        self.last = last  # highest seq delivered
        self.known_head = last  # highest seq the broker is known to hold
        self.early: dict[int, Msg] = {}

    def offer(self, msg: Msg) -> list[Msg]:
        """A live message: what can now be delivered, in order (often just ``[msg]``)."""
        if msg.seq > self.known_head:
            self.known_head = msg.seq
        if msg.seq <= self.last or msg.seq in self.early:
            return []
        if msg.seq == self.last + 1 and not self.early:
            self.last = msg.seq
            return [msg]
        if len(self.early) < MAX_BUFFER or msg.seq == self.last + 1:
            self.early[msg.seq] = msg
        return self._drain()

    def offer_run(self, msgs: list[Msg]) -> bool:
        """A run of live messages of this room with ascending consecutive seqs, as the
        broker publishes a Batch: True if it was taken whole because it follows on
        exactly; False (nothing changed) to offer them one by one."""
        first, last = msgs[0], msgs[-1]
        if self.early or first.seq != self.last + 1 or last.seq - first.seq != len(msgs) - 1:
            return False
        self.last = last.seq
        if last.seq > self.known_head:
            self.known_head = last.seq
        return True

    def fill(self, msgs: list[Msg], head: int) -> list[Msg]:
        """History fetched for the gap; ``head`` is the broker's head at that moment."""
        self.known_head = max(self.known_head, head)
        for msg in msgs:
            if msg.seq > self.last:
                self.early.setdefault(msg.seq, msg)
        return self._drain()

    def saw_head(self, head: int) -> None:
        """The broker says the room reaches ``head`` (from a Pong): a lost tail is a gap."""
        self.known_head = max(self.known_head, head)

    def missing(self) -> tuple[int, int] | None:
        """``(after, before)`` to fetch: the seqs strictly between are missing."""
        if self.early:
            return (self.last, min(self.early))
        if self.known_head > self.last:
            return (self.last, 0)
        return None

    def skip(self, upto: int, reason: str) -> Gap | None:
        """Give up on seqs up to ``upto``: report them and move past them."""
        if upto <= self.last:
            return None
        gap = Gap(self.room, self.last + 1, upto, reason)
        self.last = upto
        for seq in [s for s in self.early if s <= upto]:
            del self.early[seq]
        return gap

    def release(self) -> list[Msg]:
        return self._drain()

    def _drain(self) -> list[Msg]:
        out = []
        early = self.early
        while self.last + 1 in early:
            self.last += 1
            out.append(early.pop(self.last))
        return out
