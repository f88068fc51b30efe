"""Fair reading: frames read ahead of processing into one FIFO per sender, and served
by deficit round robin over bytes, new senders first (the sparse-flow rule of
FQ-CoDel, RFC 8290).

libzmq's ROUTER and PULL already take one message a peer in turn, but a turn of the
broker's loop processes a bounded number of bytes. Eight peers queueing 32 KB lines
put 256 KB (three turns of storing and publishing) ahead of a normal user's 100-byte
request. Read ahead into this queue, the request is served in the next turn: a sender
whose queue was empty is served first, for up to one quantum, and a sender that keeps
a queue shares the rest by bytes. Each sender's frames keep their order.

When the queue is full and several senders wait in it, a sender holding more than its
share is refused (the loop answers rate_limited) until its queue empties, and the
others are still admitted; a sender alone is held back by the bound, as before.

Plain Python (no sockets, no clock): the loop reads frames in with ``admit`` and
``put`` and takes them out with ``pop``.
"""

from __future__ import annotations

import collections
from typing import Generic, Hashable, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Items of many senders, each sender's in order; ``pop`` is deficit round robin
    by size, a sender with nothing queued before served first for one ``quantum``.

    ``max_bytes`` and ``max_items`` bound what ``room`` allows: the reader reads
    ahead freely below both. Past them it may read a little more, and ``admit``
    says which of those items to queue, refusing senders past their share; ``full``
    (twice either bound) stops it.
    """

    def __init__(self, quantum: int, max_bytes: int, max_items: int) -> None:
        if quantum <= 0 or max_bytes <= 0 or max_items <= 0:
            raise ValueError("quantum, max_bytes and max_items must be positive")
        self.quantum = quantum
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.bytes = 0
        self.items = 0
        self._queues: dict[Hashable, collections.deque[tuple[int, T]]] = {}
        self._credit: dict[Hashable, int] = {}
        self._held: dict[Hashable, int] = {}  # bytes queued per sender
        self._shedding: set[Hashable] = set()  # refused until their queue empties (admit)
        self._new: collections.deque[Hashable] = collections.deque()  # senders whose queue was empty
        self._old: collections.deque[Hashable] = collections.deque()  # senders that kept a queue

    def __len__(self) -> int:
        return self.items

    def room(self) -> bool:
        """Whether the reader may read another item ahead."""
        return self.bytes < self.max_bytes and self.items < self.max_items

    def senders(self) -> int:
        """How many senders have something queued."""
        return len(self._queues)

    def held(self, sender: Hashable) -> int:
        """Bytes ``sender`` has queued."""
        return self._held.get(sender, 0)

    def admit(self, sender: Hashable, size: int) -> bool:
        """Whether an item of ``size`` bytes that ``sender`` sent may be queued; False:
        refuse it (the caller tells the sender to retry later).

        Anything fits below ``max_bytes`` and ``max_items``. Past them, a sender alone
        in the queue is still admitted (nobody waits behind it; the reader stops at
        ``full``, and libzmq holds the rest: back-pressure, as without a queue). With
        others waiting, a sender may hold its share of ``max_bytes`` (split among the
        senders queued, itself counted): a normal user's request is still taken while
        a flood fills the queue, and a flooder over its share is refused, and then
        refused until its queue empties, so what it sent after the refused item is
        never taken before it.
        """
        if sender in self._shedding:
            return False
        if self.bytes + size <= self.max_bytes and self.items < self.max_items:
            return True
        others = len(self._queues) - (sender in self._queues)
        if not others:
            return True
        if self._held.get(sender, 0) + size <= self.max_bytes // (others + 1):
            return True
        if sender in self._queues:  # cleared when its queue empties (pop)
            self._shedding.add(sender)
        return False

    def full(self) -> bool:
        """Whether the reader must stop reading: twice either bound (what ``admit``
        lets in past the bounds, a frame at most past this)."""
        return self.bytes >= 2 * self.max_bytes or self.items >= 2 * self.max_items

    def put(self, sender: Hashable, size: int, item: T) -> None:
        """Queue ``item`` (``size`` bytes) after ``sender``'s earlier ones."""
        queue = self._queues.get(sender)
        if queue is None:
            queue = self._queues[sender] = collections.deque()
            self._credit[sender] = self.quantum
            self._held[sender] = 0
            self._new.append(sender)
        queue.append((size, item))
        self._held[sender] += size
        self.bytes += size
        self.items += 1

    def pop(self) -> T | None:
        """The next item in fair order; None when nothing is queued.

        A sender at the head of its list is served while its credit covers its next
        item; otherwise it gets a quantum more and goes to the back of the old list.
        The loop ends: every pass through the lists adds a quantum to each sender.
        """
        queues, credit = self._queues, self._credit
        while True:
            if self._new:
                line = self._new
            elif self._old:
                line = self._old
            else:
                return None
            sender = line[0]
            queue = queues[sender]
            size, item = queue[0]
            if size <= credit[sender]:
                queue.popleft()
                self.bytes -= size
                self.items -= 1
                if queue:
                    credit[sender] -= size
                    self._held[sender] -= size
                else:  # emptied: forgotten, so its next item makes it a new sender again
                    del queues[sender], credit[sender], self._held[sender]
                    self._shedding.discard(sender)
                    line.popleft()
                return item
            line.popleft()
            credit[sender] += self.quantum
            self._old.append(sender)
