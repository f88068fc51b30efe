"""What the broker is doing, for whoever runs it: Prometheus metrics and ``zchat status``.

The broker's loop keeps plain ints (``Stats``): an attribute add per turn or per frame,
never a lock or a prometheus-client call on the hot path. A custom collector reads them,
and the core's own counters and sizes, when Prometheus scrapes, in prometheus-client's
HTTP thread: nothing is computed between scrapes and the loop never waits for one.

Reading the loop's dicts from that thread is safe under the GIL for ``len`` and for a
copy (``dict(d)``, ``list(d.values())`` are single C calls); a copy that races a resize
is retried (see ``_copy``).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from bisect import bisect_left
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from zchat import __version__
from zchat import protocol as p

if TYPE_CHECKING:  # pragma: no cover
    from prometheus_client.registry import CollectorRegistry

    from zchat.broker import Broker

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9464
#: Seconds of history ``rates`` look back over (samples are taken once a tick).
RATE_WINDOW = 60.0
#: Most samples kept: a tick is at least 0.05 s in tests, 1 s normally.
MAX_SAMPLES = 1200

#: Histogram bounds in seconds: a storage append (one transaction a turn) and a loop turn.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)

#: core.counters keys that are bad input from a client (the rest are events: duplicates
#: acked again, rate limits, expired sessions, batches...).
BAD_INPUT = frozenset(
    {
        p.ErrorCode.BAD_FRAME, p.ErrorCode.BAD_ENCODING, p.ErrorCode.BAD_VERSION, p.ErrorCode.BAD_REQUEST,
        p.ErrorCode.TOO_LARGE, "bad_sid", "bad_subscription", "session_spoof", "no_session", "looker_send",
    }
)


class Histogram:
    """Counts of observations per bucket, cheap to observe (a bisect and two adds), read
    as a Prometheus histogram at scrape time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last, as prometheus-client wants them."""
        counts = list(self.counts)
        out, total = [], 0
        for bound, count in zip(self.bounds, counts):
            total += count
            out.append((repr(bound), total))
        out.append(("+Inf", total + counts[-1]))
        return out


class Stats:
    """Plain counters the broker's shell keeps as it works (read by the collector and
    by ``zchat status``). Every container here is bounded: keys are error codes, ZAP
    statuses or history kinds, all from small fixed sets."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.received = 0  # chat lines taken in (PULL and DEALER), good or bad
        self.stored = 0  # messages storage took (chat lines, joins, parts)
        self.store_failed = 0  # batches storage refused
        self.publications = 0  # PUB frames sent (a Batch is one)
        self.published = 0  # messages, presences and notices handed to the PUB socket
        self.acks = 0  # acks sent (one Ack frame may carry several)
        self.replies = 0  # request replies and errors sent
        self.errors: dict[tuple[str, str], int] = {}  # (code, "line" | "request") -> sent
        self.history: dict[str, int] = {"range": 0, "last": 0}  # range: after=, a client's catch-up
        self.zap: dict[str, int] = {}  # "accepted" | "refused" -> handshakes
        self.append_seconds = Histogram()
        self.turn_seconds = Histogram()
        self.turn_items = 0  # inputs taken in the last busy turn: how deep the queues ran
        self.turn_bytes_max = 0  # most bytes of requests and lines one turn took (TURN_BYTES bounds it)
        self.backlog_bytes_max = 0  # most bytes one input held read ahead (READ_AHEAD_BYTES bounds it)
        self.samples: deque[tuple[float, int, int, int, int]] = deque(maxlen=MAX_SAMPLES)

    def error(self, code: str, line: bool) -> None:
        key = (code, "line" if line else "request")
        self.errors[key] = self.errors.get(key, 0) + 1

    def refused_lines(self) -> int:
        return sum(n for (_, what), n in list(self.errors.items()) if what == "line")

    def sample(self, now: float) -> None:
        """Note the totals (once a tick) so ``rates`` can tell the last minute's."""
        self.samples.append((now, self.received, self.stored, self.refused_lines(), sum(self.history.values())))

    def rates(self, now: float) -> dict[str, float]:
        """Per second over about the last RATE_WINDOW seconds (0.0 before two samples)."""
        names = ("lines_received", "messages_stored", "lines_refused", "history_requests")
        current = (now, self.received, self.stored, self.refused_lines(), sum(self.history.values()))
        oldest = None
        for sample in self.samples:
            if sample[0] >= now - RATE_WINDOW:
                oldest = sample
                break
        if oldest is None or current[0] - oldest[0] <= 0:
            return {name: 0.0 for name in names}
        span = current[0] - oldest[0]
        return {name: round((current[i + 1] - oldest[i + 1]) / span, 3) for i, name in enumerate(names)}


def _copy(mapping: dict[Any, Any]) -> dict[Any, Any]:
    """A copy of a dict the loop thread may be changing (retried if it resized mid-copy)."""
    for _ in range(10):
        try:
            return dict(mapping)
        except RuntimeError:
            continue
    return {}


def storage_size(storage: object) -> tuple[str, int]:
    """(description, bytes on disk) of the broker's storage; -1 bytes when unknown (Redis:
    ask Redis, ``INFO memory`` and the size of its RDB/AOF files)."""
    path = getattr(storage, "path", None)
    if isinstance(path, Path):
        from zchat.storage.sqlite_search import file_bytes

        return f"sqlite {path}", file_bytes(path)
    return type(storage).__name__.removesuffix("Storage").lower() or "unknown", -1


def status(broker: Broker, body: p.StatusReply) -> p.StatusReply:
    """The core's StatusReply with what only the shell knows filled in."""
    import msgspec

    now = time.monotonic()
    stats = broker.stats
    kind, size = storage_size(broker.storage)
    g = broker.guard_config
    limits = dict(body.limits)
    limits.update(
        max_per_address=g.max_per_address,
        max_connections=broker.guard.total_cap if broker.guard is not None else g.max_connections,
        claims_per_minute=g.claims_per_minute, claim_timeout=g.claim_timeout,
        queue_budget=g.queue_budget, send_budget=g.send_budget, handshake_timeout=g.handshake_timeout,
        reserved_names=",".join(sorted(broker.reserved)),
    )
    since = broker.outage.since
    behind, index_bytes = search_index(broker.storage) or (-1, -1)
    return msgspec.structs.replace(
        body, version=__version__, uptime=round(now - stats.started, 3), storage=kind, storage_bytes=size,
        rates=stats.rates(now), limits=limits, storage_unavailable=round(now - since, 3) if since else 0.0,
        search_behind=behind, search_bytes=index_bytes,
    )


def search_index(storage: Any) -> tuple[int, int] | None:
    """(commits the search index has not reached, bytes of its file), or None for a store
    without one (Redis, SQLite with search off)."""
    index = getattr(storage, "search_index", None)
    return index() if index is not None else None


# ------------------------------------------------------------------ Prometheus


class BrokerCollector:
    """Reads a running broker at scrape time (prometheus-client calls ``collect`` from
    its HTTP thread)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def describe(self) -> list[Any]:
        return []  # not known before the broker runs; prometheus-client then skips the check

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

        broker, stats = self.broker, self.broker.stats
        core = broker.core
        yield InfoMetricFamily("zchat_broker", "The broker's version, history epoch and boot id.", value={
            "version": __version__, "epoch": core.epoch if core else "", "boot": core.boot if core else "",
        })
        yield GaugeMetricFamily("zchat_uptime_seconds", "Seconds since the broker started.", value=time.monotonic() - stats.started)

        def counter(name: str, doc: str, value: float) -> Any:
            return CounterMetricFamily(name, doc, value=value)

        yield counter("zchat_lines_received", "Chat lines taken in (PULL and DEALER), good or bad.", stats.received)
        yield counter("zchat_messages_stored", "Messages (chat lines, joins, parts) storage took.", stats.stored)
        yield counter("zchat_store_failures", "Batches storage refused (their senders were told).", stats.store_failed)
        yield counter("zchat_publications", "PUB frames sent (a batch of messages is one).", stats.publications)
        yield counter("zchat_published_events", "Messages, presences and notices handed to the PUB socket.", stats.published)
        yield counter("zchat_acks", "Ack frames sent to senders.", stats.acks)
        yield counter("zchat_replies", "Replies to requests, errors included.", stats.replies)
        refused = CounterMetricFamily("zchat_errors", "Errors sent, by code and by what they answer (line or request).", labels=["code", "what"])
        for (code, what), n in sorted(_copy(stats.errors).items()):
            refused.add_metric([code, what], n)
        yield refused
        history = CounterMetricFamily("zchat_history_requests", "History queries run: range (after=, a catch-up) or last (newest).", labels=["kind"])
        for kind, n in sorted(_copy(stats.history).items()):
            history.add_metric([kind], n)
        yield history
        zap = CounterMetricFamily("zchat_zap_decisions", "Handshakes decided, by verdict.", labels=["verdict"])
        for verdict, n in sorted(_copy(stats.zap).items()):
            zap.add_metric([verdict], n)
        yield zap
        for name, doc, hist in (
            ("zchat_storage_append_seconds", "Time one storage append (a turn's batch) took.", stats.append_seconds),
            ("zchat_loop_turn_seconds", "Time one busy turn of the broker's loop took.", stats.turn_seconds),
        ):
            yield HistogramMetricFamily(name, doc, buckets=hist.buckets(), sum_value=hist.sum)
        yield GaugeMetricFamily("zchat_turn_inputs", "Frames the last busy loop turn took (up to 128 a socket: the queues' depth).", value=stats.turn_items)
        yield GaugeMetricFamily("zchat_read_ahead_bytes_max", "Most bytes one input (ROUTER, PULL) held read but not yet taken (bounded at 4 MiB).", value=stats.backlog_bytes_max)
        if core is not None:
            counters = _copy(core.counters)
            bad = CounterMetricFamily("zchat_bad_input", "Bad input from clients, by kind.", labels=["kind"])
            events = CounterMetricFamily("zchat_core_events", "Other events the core counted, by kind.", labels=["event"])
            for key, n in sorted(counters.items()):
                (bad if key in BAD_INPUT else events).add_metric([key], n)
            yield bad
            yield events
            public = len(core.room_index)
            yield GaugeMetricFamily("zchat_sessions", "Live sessions (look-only ones included).", value=len(core.sessions))
            yield GaugeMetricFamily("zchat_users_online", "Users with at least one session.", value=len(core.devices))
            yield GaugeMetricFamily("zchat_users", "Claimed names.", value=len(core.users))
            yield GaugeMetricFamily("zchat_rooms", "Public rooms with members.", value=public)
            yield GaugeMetricFamily("zchat_conversations", "Direct-message conversations.", value=max(0, len(core.members) - public))
            yield GaugeMetricFamily("zchat_messages", "Sequenced messages over all rooms (the sum of the heads).", value=sum(_copy(core.heads).values()))
            yield GaugeMetricFamily("zchat_dedup_entries", "Client message ids remembered for deduplication.", value=len(core.dedup.order))
            yield GaugeMetricFamily("zchat_rate_buckets", "Rate-limit buckets held (users, requests, rooms).",
                                    value=len(core.buckets) + len(core.request_buckets) + len(core.room_buckets))
        if broker.guard is not None:
            yield GaugeMetricFamily("zchat_connections", "TCP connections the edge counts now.", value=broker.guard.total)
            yield GaugeMetricFamily("zchat_connections_max", "Connections the edge takes in all.", value=broker.guard.total_cap)
            cut = CounterMetricFamily("zchat_connections_cut", "Connections the edge cut, by why.", labels=["reason"])
            for reason, n in sorted(_copy(broker.guard.cut).items()):
                cut.add_metric([reason], n)
            yield cut
        kind, size = storage_size(broker.storage)
        if size >= 0:
            yield GaugeMetricFamily("zchat_storage_bytes", "Bytes the history takes on disk (SQLite file, WAL and shm).", value=size)
        searching = search_index(broker.storage)
        if searching is not None:
            yield GaugeMetricFamily("zchat_search_index_behind", "Commits whose lines the search index thread has not indexed yet (SQLite).", value=searching[0])
            yield GaugeMetricFamily("zchat_search_index_bytes", "Bytes the search index file takes on disk (history.db-search, WAL and shm).", value=searching[1])
        outage = getattr(broker, "outage", None)
        since = getattr(outage, "since", 0.0)
        yield GaugeMetricFamily("zchat_storage_unavailable_seconds", "Seconds the store has refused writes (disk full, read-only); 0 while it writes.",
                                value=time.monotonic() - since if since else 0.0)
        retention = getattr(broker, "retention", None)
        if retention is not None:
            yield counter("zchat_retention_pruned", "Messages retention deleted since start.", retention.pruned)
            yield counter("zchat_retention_passes", "Retention passes over all rooms completed.", retention.passes)
            yield counter("zchat_retention_busy_seconds", "Seconds spent in prune calls (the loop waited that long, in pieces).", retention.busy)


def parse_address(text: str, public: bool = False) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` -> (host, port); the host defaults to 127.0.0.1.

    A host that is not loopback is refused (ValueError) unless ``public``: metrics tell
    who is online and how busy the broker is, so they are not served to the network by
    accident.
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics wants HOST:PORT (such as 127.0.0.1:{DEFAULT_METRICS_PORT}), got {text!r}")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not public:
        raise ValueError(f"--metrics {text}: {host} is not a loopback address; add --metrics-public to serve metrics there")
    return host, int(port)


class MetricsServer:
    """prometheus-client's HTTP server in a thread of its own, on a registry of this
    broker's collector and the process collector (RSS, CPU, open descriptors)."""

    def __init__(self, broker: Broker, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.registry.register(BrokerCollector(broker))  # type: ignore[arg-type]
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        self.host, self.port = host, self.server.server_address[1]
        log.info("metrics at http://%s:%d/metrics", host if ":" not in host else f"[{host}]", self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class MetricsError(Exception):
    """Metrics cannot be served as asked (bad address, port in use, no prometheus-client)."""


def start_metrics(broker: Broker, address: str, public: bool = False) -> MetricsServer:
    """Serve ``broker``'s metrics at ``address`` (see parse_address); MetricsError if not."""
    try:
        host, port = parse_address(address, public)
    except ValueError as exc:
        raise MetricsError(str(exc)) from None
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MetricsError("--metrics needs prometheus-client (a dependency of zchat): pip install prometheus-client") from None
    try:
        return MetricsServer(broker, host, port)
    except OSError as exc:
        raise MetricsError(f"cannot serve metrics at {host}:{port}: {exc}") from None
