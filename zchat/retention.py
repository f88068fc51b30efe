"""History retention: prune what is older than ``--retain-days`` or beyond the newest
``--retain-messages`` of each room, in the background.

It runs as its own task on the broker's event loop and only ever calls
``Storage.prune``, a batch at a time with a pause between batches: each batch is one
short write (about a millisecond for 500 SQLite rows), so the broker's loop runs
between any two of them and never waits on a long delete. A second SQLite connection in
a thread would instead hold the write lock while the broker wants to commit (its
``busy_timeout`` then sleeps in steps of several milliseconds), and add a second writer
the checkpoint thread must follow. Pruned rows go through the WAL like any write; the
freed pages are reused by new messages, so the file stops growing rather than shrinks
(``zchat backup`` writes a compact copy).

Clients that ask for pruned messages get history that starts later than asked, which
the reference client reports as a Gap "no longer in history", like any other loss.
Defaults keep everything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from zchat.storage import Storage, StorageError

log = logging.getLogger(__name__)

DAY = 86_400.0


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """What history to keep; 0 means no bound of that kind."""

    days: float = 0.0  # delete messages stamped more than this many days ago
    messages: int = 0  # keep at most this many messages a room (the newest)
    batch: int = 500  # rows a prune call deletes at most (one short write)
    pause: float = 0.01  # seconds between two batches: the broker's loop runs in between
    every: float = 60.0  # seconds between passes over all rooms

    @property
    def active(self) -> bool:
        return self.days > 0 or self.messages > 0

    def describe(self) -> str:
        parts = []
        if self.days > 0:
            parts.append(f"{self.days:g} days")
        if self.messages > 0:
            parts.append(f"{self.messages} messages a room")
        return " and ".join(parts) or "everything"


class Retention:
    """Applies a RetentionPolicy to a store, forever (cancel the task to stop it)."""

    def __init__(self, storage: Storage, policy: RetentionPolicy) -> None:
        self.storage = storage
        self.policy = policy
        self.pruned = 0  # messages deleted since start
        self.passes = 0  # passes over all rooms completed
        self.longest_batch = 0.0  # seconds, the longest single prune call
        self.busy = 0.0  # seconds spent in prune calls (the loop was held that long, in pieces)

    async def run(self) -> None:
        """A pass at once, then one every ``policy.every`` seconds; errors wait for the next."""
        if not self.policy.active:
            return
        log.info("retention: keeping %s; a pass every %gs", self.policy.describe(), self.policy.every)
        while True:
            try:
                await self.pass_once()
            except StorageError as exc:  # disk full, store gone: try again next pass
                log.warning("retention pass stopped: %s", exc)
            await asyncio.sleep(self.policy.every)

    async def pass_once(self) -> int:
        """Prune every room down to the policy; return how many messages went."""
        policy = self.policy
        before_ts = time.time() - policy.days * DAY if policy.days > 0 else 0.0
        total = rooms = 0
        for room in sorted(await self.storage.heads()):
            deleted = 0
            while True:
                started = time.perf_counter()
                n = await self.storage.prune(room, keep=policy.messages, before_ts=before_ts, batch=policy.batch)
                took = time.perf_counter() - started
                self.busy += took
                self.longest_batch = max(self.longest_batch, took)
                if not n:
                    break
                deleted += n
                await asyncio.sleep(policy.pause)  # the broker's turn
            if deleted:
                rooms += 1
                total += deleted
        self.pruned += total
        self.passes += 1
        if total:
            log.info("retention: pruned %d messages in %d rooms (keeping %s)", total, rooms, policy.describe())
        return total
