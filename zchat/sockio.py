"""Hot-path socket helpers shared by the broker and the client library.

pyzmq's ``send_multipart``/``recv_multipart`` convert enum flags and ask for RCVMORE
through the option layer on every call: about half of what a small message costs them.
These do the same with plain ints and the frame's own ``more`` flag. All are
non-blocking: a receive raises ``zmq.Again`` when nothing is queued, a send when the
high-water mark is reached.
"""

from __future__ import annotations

from typing import Sequence

import zmq

# pyzmq's own send, under its Python layer (which only adds routing_id and group, for
# draft sockets): about 1 us a call less, four calls a quiet line in the broker.
_send = zmq.backend.Socket.send

NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)


def readable(sock: zmq.Socket) -> bool:
    """True if a message is queued (also re-arms the socket's edge-triggered ZMQ_FD)."""
    return bool(sock.getsockopt(EVENTS) & POLLIN)


def recv_frames(sock: zmq.Socket) -> list[zmq.Frame]:
    """One whole message as Frames (for their ``bytes`` and ``get("User-Id")``)."""
    frame = sock.recv(NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(NOBLOCK, copy=False)
        frames.append(frame)
    return frames


class Drained(zmq.Again):
    """``take``'s "nothing is queued": a ``zmq.Again`` (caught as one) made for a fraction
    of what pyzmq's own costs (its EAGAIN is about 17 us a receive here, the question 2.5)."""

    def __init__(self) -> None:
        pass


#: ``take`` asks ZMQ_EVENTS before a turn's receives 1 to ASK_FIRST-1; from then on it
#: receives until EAGAIN, since asking costs every message of a burst.
ASK_FIRST = 4


def take(sock: zmq.Socket, n: int) -> list[zmq.Frame]:
    """The ``n``-th (from 0) whole message of a turn on a socket just found readable, as
    Frames; ``zmq.Again`` once none is queued. A quiet turn (a line or two) thus ends on a
    question, not on a receive that finds nothing."""
    if 0 < n < ASK_FIRST and not readable(sock):
        raise Drained
    return recv_frames(sock)


def recv_parts(sock: zmq.Socket) -> list[bytes]:
    """One whole message as bytes."""
    return [frame.bytes for frame in recv_frames(sock)]


def send_parts(sock: zmq.Socket, parts: Sequence[bytes]) -> None:
    """One whole message on a plain (not ``zmq.asyncio``) socket; on ``zmq.Again``
    nothing of it was queued (ZeroMQ queues a multipart message atomically once its
    first part is accepted)."""
    last = len(parts) - 1
    for i, part in enumerate(parts):
        _send(sock, part, NOBLOCK | SNDMORE if i < last else NOBLOCK)


def close_monitored(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Close a socket and the reader of its monitor, the monitor stopped first.

    libzmq's I/O thread writes each monitor event with a blocking send on the monitor's
    PAIR: once its reader is closed while the socket still emits (a reconnect, a
    handshake finishing, its own teardown), that send waits for ever, and every socket
    of the context stops moving (a whole test run's clients went silent so).
    """
    if not sock.closed:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:  # the context is terminating: nothing emits any more
            pass
    monitor.close(linger=0)
    sock.close(linger=0)
