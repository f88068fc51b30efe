"""Raw ZeroMQ peers for the abuse benchmark, and what an attacker saw.

An attacker is not a zchat.client.Client: it speaks the wire format by hand
(bodies from zchat.protocol.encode, CURVE keys, one DEALER routing id of its choosing)
and counts what the broker answered: replies by kind, errors by code, refused
handshakes (ZAP 400) and connections the broker dropped. Its keypair is the one the
reference client derives for (name, SECRET): a seeded or claimed name's, an
authenticated attacker; a fresh name's key owns nothing until it claims (look-only).
Everything here is synchronous and runs in one attacker process; every socket gets
linger=0.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import time
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from zchat import auth, keys
from zchat import protocol as p

log = logging.getLogger(__name__)

#: Every attacker's secret, from which its key for a name is derived.
SECRET = "abuse-bench-secret-0123456789"
_MONITORED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_DISCONNECTED
)
_any = msgspec.msgpack.Decoder()


def digest(name: str, secret: str = SECRET) -> bytes:
    """What the broker stores for ``name`` owned by its key for ``secret`` (for seeding)."""
    from zmq.utils import z85

    return auth.key_digest([z85.decode(keys.keypair_from_secret(secret, name)[0])])


@dataclasses.dataclass
class Saw:
    """What the attacker saw: the "attacker limited?" column is made from this."""

    sent: int = 0  # frames the attacker got onto its sockets
    stored: int = 0  # chat lines the broker acked as stored
    replies: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reply kind -> count
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # error code -> count
    refused: int = 0  # handshakes refused (ZAP 400 or no detail)
    dropped: int = 0  # connections the broker closed after a good handshake
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)  # attack-specific figures

    def take(self, body: bytes) -> dict[str, Any] | None:
        """Count one reply body; return it decoded (a plain dict) or None if unreadable."""
        try:
            raw = _any.decode(body)
        except Exception:
            self.replies["unreadable"] += 1
            return None
        if not isinstance(raw, dict):
            self.replies["unreadable"] += 1
            return None
        kind = str(raw.get("k", "?"))
        self.replies[kind] += 1
        if kind == "error":
            self.errors[str(raw.get("code", "?"))] += 1
        elif kind == "ack" and isinstance(raw.get("stored"), list):
            self.stored += len(raw["stored"])
        return raw

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "stored": self.stored, "replies": dict(self.replies), "errors": dict(self.errors),
            "refused": self.refused, "dropped": self.dropped, "notes": self.notes,
        }


def curve(sock: zmq.Socket, server_key: bytes, name: str, secret: str = SECRET) -> None:
    """Give ``sock`` the broker's key and the keypair of (name, secret)."""
    sock.curve_serverkey = server_key
    sock.curve_publickey, sock.curve_secretkey = keys.keypair_from_secret(secret, name)


class Peer:
    """One raw socket with CURVE keys (``server_key``: the broker's) and a handshake monitor.

    ``rcvhwm``/``rcvbuf`` small make a peer that does not read: the broker's side of
    the connection then backs up instead of the attacker's memory.
    """

    def __init__(
        self, ctx: zmq.Context, kind: int, endpoint: str, name: str, saw: Saw, *, server_key: bytes,
        secret: str = SECRET, routing_id: bytes | None = None, rcvhwm: int | None = None,
        rcvbuf: int | None = None, sndhwm: int | None = None, monitor: bool = True,
    ) -> None:
        self.saw = saw
        self.name = name
        self.sock = ctx.socket(kind)
        self.sock.linger = 0
        curve(self.sock, server_key, name, secret)
        if routing_id is None and kind == zmq.DEALER:
            routing_id = secrets.token_hex(8).encode()
        if routing_id is not None:
            self.sock.routing_id = routing_id
        self.sid = routing_id.decode("latin-1") if routing_id else ""
        if rcvhwm is not None:
            self.sock.rcvhwm = rcvhwm
        if rcvbuf is not None:
            self.sock.rcvbuf = rcvbuf
        if sndhwm is not None:
            self.sock.sndhwm = sndhwm
        self.mon: zmq.Socket | None = None
        if monitor:
            # An inproc address of its own: pyzmq's default names it after the fd, which a
            # socket made right after a closed one reuses before libzmq lets the name go.
            self.mon = self.sock.get_monitor_socket(_MONITORED, addr=f"inproc://abuse-monitor-{secrets.token_hex(8)}")
            self.mon.linger = 0
        self.state = "connecting"  # -> "up", "refused"
        self.sock.connect(endpoint)

    def events(self) -> None:
        """Take the monitor's events: count refusals and drops."""
        if self.mon is None:
            return
        while True:
            try:
                event = parse_monitor_message(self.mon.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.state = "up"
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                self.state = "refused"
                self.saw.refused += 1
            elif event == zmq.EVENT_DISCONNECTED and self.state == "up":
                self.state = "connecting"
                self.saw.dropped += 1

    def wait_up(self, timeout: float) -> bool:
        """Wait for the handshake's verdict; True when accepted."""
        deadline = time.monotonic() + timeout
        while self.state == "connecting" and time.monotonic() < deadline:
            if self.mon is not None and self.mon.poll(20):
                self.events()
        return self.state == "up"

    def send(self, body: bytes) -> bool:
        """Queue one frame without blocking; False when the socket's queue is full."""
        try:
            self.sock.send(body, zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.saw.sent += 1
        return True

    def recv(self) -> dict[str, Any] | None:
        """One reply, counted, or None when nothing is queued."""
        try:
            body = self.sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None
        return self.saw.take(body) or {}

    def drain(self, limit: int = 100_000) -> int:
        """Read and count what is queued (at most ``limit``); return how many."""
        n = 0
        while n < limit and self.recv() is not None:
            n += 1
        return n

    def call(self, body: bytes, rid: int, timeout: float) -> dict[str, Any] | None:
        """Send a request and wait for the reply with this rid (others are counted)."""
        if not self.send(body):
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(20):
                reply = self.recv()
                if reply is not None and reply.get("rid") == rid:
                    return reply
            self.events()
        return None

    def claim(self, rid: int, timeout: float) -> bool:
        """Ask, on this look-only connection, that its key own ``name`` (step one of a
        claim; the next handshake of the key decides it). True when the broker said ok."""
        reply = self.call(p.encode(p.Claim(rid=rid, name=self.name)), rid, timeout)
        return reply is not None and reply.get("k") == "ok"

    def hello(self, rid: int = 1, timeout: float = 5.0) -> bool:
        reply = self.call(p.encode(p.Hello(rid=rid, client="abuse")), rid, timeout)
        return reply is not None and reply.get("k") == "welcome"

    def close(self) -> None:
        self.events()
        if self.mon is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self.mon.close(linger=0)
        self.sock.close(linger=0)
