"""Log helpers of the broker that must not flood the log: bad input at most once a
second per kind, and one storage outage as a few lines, not one per refused batch."""

import logging

log = logging.getLogger(__package__)  # one logger for the whole broker: "zchat.broker"


class RateLimitedLog:
    """Logs bad input at most once a second per kind, with how many were suppressed."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def warn(self, kind: str, detail: str, now: float) -> None:
        if now - self.last.get(kind, 0.0) < 1.0:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return
        extra = self.suppressed.pop(kind, 0)
        self.last[kind] = now
        log.warning("bad input (%s): %s%s", kind, detail, f" (+{extra} more suppressed)" if extra else "")


class StorageOutage:
    """Tracks a store that cannot take writes (disk full, read-only, server gone): logs it
    at most once a second with how many batches were refused meanwhile, and once when
    writes succeed again. The broker needs no action to recover: every batch tries."""

    def __init__(self) -> None:
        self.since = 0.0  # monotonic time of the first refusal; 0: storage is fine
        self.last_log = 0.0
        self.refused = 0  # batches refused since the last log line
        self.total = 0  # lines refused over the outage

    def failed(self, exc: Exception, lines: int, now: float) -> None:
        if not self.since:
            self.since = now
        self.refused += 1
        self.total += lines
        if now - self.last_log >= 1.0:
            log.error(
                "storage unavailable, refusing sends with storage_unavailable (reads go on): %s "
                "(%d batch(es) refused since the last report, %d lines in %.0fs)",
                exc, self.refused, self.total, now - self.since,
            )
            self.last_log, self.refused = now, 0

    def stored(self, now: float) -> None:
        if self.since:
            log.warning("storage writable again after %.1fs; %d lines were refused meanwhile", now - self.since, self.total)
            self.since, self.refused, self.total, self.last_log = 0.0, 0, 0, 0.0
