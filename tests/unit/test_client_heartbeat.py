"""The reference client's heartbeat timing (plain values): jittered waits that end at a
whole second of the wall clock, so one second's pings reach the broker together."""

from __future__ import annotations

import math

from zchat.client import connection as c


def test_a_wait_ends_at_a_whole_second_and_is_never_shortened() -> None:
    """fails if aligned() returns the wait unchanged (98.5 + 20.3 ends mid-second)."""
    for now in (1_764_600_000.0, 1_764_600_000.25, 98.5, 7.999):
        for wait in (0.0, 0.2, 20.3, 119.99, 144.0):
            got = c.aligned(wait, now)
            end = now + got
            assert wait <= got < wait + c.ALIGN + 1e-6
            assert math.isclose(end, round(end), abs_tol=1e-6), (now, wait, got)


def test_the_jitter_keeps_pings_inside_the_presence_timeout() -> None:
    """The longest gap between pings (the jitter's top, the alignment, a lazy ping's
    timeout) stays under the broker's 3 heartbeats for every heartbeat it aligns."""
    for heartbeat in (c.ALIGN_FROM, 60.0, 120.0, 600.0):
        longest = heartbeat * max(c.JITTER[1], c.FIRST_JITTER[1]) + c.ALIGN + min(heartbeat, c.PING_TIMEOUT) + 1
        assert longest < 3 * heartbeat
