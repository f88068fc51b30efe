"""Keeping Python's cyclic garbage collector off the gateway's settled heap.

A gateway of 500 users holds 500 Clients, their sockets, trackers and tabs: a heap of
a few hundred MB that lives as long as the users stay signed in. Python's collector
scans the whole of it in each full (generation 2) collection, a pause of 100-500 ms
on the gateway's one thread, and every tab's line waits that long (the benchmark's
p99: docs/web.md, "session 4"). Those objects are not garbage; scanning them finds
nothing. So once the users have stopped changing for ``settle`` seconds, the heap is
frozen (``gc.freeze()``): later collections scan only what was made since. A change is
a sign-in or sign-out, and also presence (``grew()``): when 500 users are in a room a
thousand join, each user's Client learns a thousand members, half a million objects made
after the sign-ins settled, and the first full collection over them was a 0.5-0.7 s
pause (the benchmark's worst run: docs/web.md, "session 5"). Full collections that take
over ``SLOW_COLLECTION`` are logged.

Frozen objects are never collected, so a user who signs out would leave whatever
cycles their Client held. Those are bounded: after ``sweep_after`` sign-outs the
next settling first unfreezes and collects once (one full pause, at a quiet moment
and rarely), then freezes again. ``stop()`` gives the heap back to the collector.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)

#: Seconds without a sign-in or sign-out before the heap is frozen.
SETTLE = 1.0
#: Sign-outs whose leftovers may stay frozen before a full collection frees them.
SWEEP_AFTER = 32
#: A full collection this long (seconds) is logged: every tab's line waited for it.
SLOW_COLLECTION = 0.05


class Collector:
    """Freezes the heap once the set of users settles; sweeps after sign-outs."""

    def __init__(self, settle: float = SETTLE, sweep_after: int = SWEEP_AFTER) -> None:
        self.settle = settle
        self.sweep_after = sweep_after
        self.left = 0  # sign-outs since the last sweep
        self.freezes = 0
        self.sweeps = 0
        self._timer: asyncio.TimerHandle | None = None
        self._frozen = False
        self._grown = False  # changed since the timer was armed
        self._full_at = 0.0  # when the running full collection started
        gc.callbacks.append(self._on_collection)

    def changed(self, left: bool = False) -> None:
        """A user signed in (or out, ``left``): freeze again once things settle."""
        if left:
            self.left += 1
        self.grew()

    def grew(self) -> None:
        """The heap gained objects it keeps (members, rooms): freeze them too once things
        settle. Cheap enough for every presence event: a flag, and at most one timer."""
        if self._timer is None:
            self._grown = False
            self._timer = asyncio.get_running_loop().call_later(self.settle, self._check)
        else:
            self._grown = True

    def _check(self) -> None:
        """``settle`` seconds after the timer was armed: freeze if nothing changed since,
        else look again in ``settle`` seconds."""
        self._timer = None
        if self._grown:
            self.grew()
            return
        self._settled()

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._full_at = time.perf_counter()
        elif self._full_at:
            took = time.perf_counter() - self._full_at
            self._full_at = 0.0
            if took >= SLOW_COLLECTION:
                log.info("a full garbage collection held the gateway %.0f ms (%d objects freed)", took * 1000, info.get("collected", 0))

    def _settled(self) -> None:
        if self.left >= self.sweep_after:
            t0 = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            self.left = 0
            self.sweeps += 1
            log.info("swept the heap after sign-outs: %d objects freed in %.0f ms", found, (time.perf_counter() - t0) * 1000)
        gc.freeze()
        self._frozen = True
        self.freezes += 1
        log.debug("froze the heap: %d objects out of the collector's reach", gc.get_freeze_count())

    def stop(self) -> None:
        """Unfreeze: the gateway is closing, its objects are the collector's again."""
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._frozen:
            gc.unfreeze()
            self._frozen = False
