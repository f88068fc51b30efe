"""What every benchmark process shares: the chat-sized payload, sizes per mode, clocks.

A payload is one fixed-width ASCII record, the same bytes for every system (zchat sends
it as the text of a chat line, without the newline)::

    PP|NNNNNNNNN|TTTTTTTTTTTTTTTTT|lorem ipsum ...\n      (100 bytes)

``PP`` is the publisher (``PR`` marks a readiness probe, never counted), ``N`` the
publisher's message number, ``T`` ``time.monotonic()`` just before the send call. Linux's
monotonic clock is shared by every process, so a subscriber computes end-to-end
latency as its own ``time.monotonic()`` minus ``T``.
"""

from __future__ import annotations

import dataclasses
import time

RECORD = 100  # bytes, newline included
TEXT = RECORD - 1  # characters of the zchat chat line
PROBE = "PR"  # readiness probe: never counted
FLUSH = "FL"  # sent after a run: counted, never timed (it marks the end, so lost tails show)
ROOM = "bench"
SECRET = "bench-secret-0123456789abcdef"  # zchat PLAIN secret (>= 16 characters)
_FILLER = ("the quick brown fox jumps over the lazy dog while the broker keeps every line in order " * 2)
_HEAD = 2 + 1 + 9 + 1 + 17 + 1  # "PP|NNNNNNNNN|TTTTTTTTTTTTTTTTT|"
_PAD = _FILLER[: TEXT - _HEAD]

now = time.monotonic


def text(pub: int | str, n: int, t: float | None = None) -> str:
    """One chat line of exactly TEXT characters."""
    who = pub if isinstance(pub, str) else f"{pub:02d}"
    return f"{who}|{n:09d}|{now() if t is None else t:17.6f}|{_PAD}"


def record(pub: int | str, n: int, t: float | None = None) -> bytes:
    """The same line as bytes with a newline: the stream record of the threaded chat."""
    return (text(pub, n, t) + "\n").encode()


BLOCK = 1000  # records pre-built at a time by a blasting publisher
_LOW = [f"{k:03d}" for k in range(BLOCK)]
_LOW_B = [k.encode() for k in _LOW]


def block(pub: int | str, first: int, t: float, as_text: bool = False) -> list:
    """Records ``first`` .. ``first + 999`` (``first`` a multiple of 1,000), stamped ``t``.

    Every blasting publisher, whatever the system, sends these: the payloads are built
    a thousand at a time with only the number's last three digits differing, so the
    publisher's Python cost per line is one list item, not a format call (which capped the
    ZeroMQ peers near 257k lines/s). The stamp is the block's build time: blasts count
    lines and never time them; paced runs use ``record``/``text`` per line.
    """
    who = pub if isinstance(pub, str) else f"{pub:02d}"
    head = f"{who}|{first // BLOCK:06d}"
    if as_text:
        tail = f"|{t:17.6f}|{_PAD}"
        return [head + low + tail for low in _LOW]
    head_b, tail_b = head.encode(), f"|{t:17.6f}|{_PAD}\n".encode()
    return [head_b + low + tail_b for low in _LOW_B]


def stamp(line: str | bytes) -> float:
    """The send time written in a line or record."""
    return float(line[13:30])


SYSTEMS = ("zchat", "zmq-proxy", "py-forwarder", "redis", "threaded")
#: The zchat broker in other settings, measured beside "zchat" (CURVE, one I/O thread)
#: with --encryption: the test-only plaintext mode (what CURVE costs), and CURVE with two
#: libzmq I/O threads (whether the I/O thread is the limit on a 2-core machine).
VARIANTS = ("zchat-plain", "zchat-io2")
LABELS = {
    "zchat": "zchat",
    "zchat-plain": "zchat plaintext",
    "zchat-io2": "zchat IO_THREADS=2",
    "zmq-proxy": "libzmq proxy",
    "py-forwarder": "Python forwarder",
    "redis": "Redis pub/sub",
    "threaded": "threaded chat",
}


def base(system: str) -> str:
    """The system a variant is of ("zchat-plain" -> "zchat"): clients and scenarios treat them alike."""
    return "zchat" if system.startswith("zchat") else system


@dataclasses.dataclass
class Sizes:
    """How big and how long each scenario is; ``quick`` and ``full`` are the documented modes."""

    name: str
    window: float  # seconds a max-rate publisher runs at most
    ingest_budget: int  # messages a max-rate ingest run sends at most
    ingest_pubs: tuple[int, ...]
    fanout_subs: tuple[int, ...]
    fanout_deliveries: int  # messages x subscribers per fan-out run (bounds memory and time)
    latency_seconds: float
    latency_rate: int
    latency_subs: tuple[int, ...]
    stall_subs: int  # the others; the stalled one comes on top
    stall_messages: int  # most lines; enough to fill the socket buffers of a stopped reader
    stall_window: float  # most seconds the stall publisher runs
    scale_clients: tuple[int, ...]
    scale_rest: float  # seconds of idle measurement
    history_rows: int
    history_queries: int
    drain: float  # most seconds to wait for subscribers after the publishers stop
    heartbeat: float  # zchat broker heartbeat for the load scenarios

    @classmethod
    def mode(cls, name: str) -> "Sizes":
        if name == "tiny":
            return cls(
                name="tiny", window=0.3, ingest_budget=2_000, ingest_pubs=(1, 2), fanout_subs=(2, 5),
                fanout_deliveries=4_000, latency_seconds=0.3, latency_rate=2_000, latency_subs=(3, 1),
                stall_subs=2, stall_messages=2_000, stall_window=0.3, scale_clients=(10,), scale_rest=0.2,
                history_rows=5_000, history_queries=10, drain=4.0, heartbeat=5.0,
            )
        if name == "quick":
            return cls(
                name="quick", window=0.8, ingest_budget=200_000, ingest_pubs=(1, 4), fanout_subs=(10, 100, 1000),
                fanout_deliveries=100_000, latency_seconds=0.75, latency_rate=2_000, latency_subs=(10, 1),
                stall_subs=9, stall_messages=100_000, stall_window=1.2, scale_clients=(500,), scale_rest=1.0,
                history_rows=1_000_000, history_queries=50, drain=8.0, heartbeat=5.0,
            )
        if name == "full":
            return cls(
                name="full", window=4.0, ingest_budget=1_000_000, ingest_pubs=(1, 4), fanout_subs=(10, 100, 1000),
                fanout_deliveries=1_000_000, latency_seconds=8.0, latency_rate=2_000, latency_subs=(10, 1),
                stall_subs=9, stall_messages=200_000, stall_window=8.0, scale_clients=(1000, 10_000), scale_rest=60.0,
                history_rows=1_000_000, history_queries=300, drain=25.0, heartbeat=5.0,
            )
        raise ValueError(f"unknown mode {name!r}")
