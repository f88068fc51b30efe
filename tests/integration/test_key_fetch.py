"""The plain key request is asked again when it goes unanswered.

A broker out of descriptors frees some by cutting the oldest unfinished handshakes,
the key endpoint's included; a request written to a connection cut that way is never
answered, and a DEALER does not resend it. A client with a connect timeout of 30 s
must not give up after its first 2 s (CI, 2026-12-01: the descriptor-limit test failed
with "no answer from the broker's key endpoint" while the broker was up).
"""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from tests.conftest import free_port_base
from zchat import keys

KEY = zmq.curve_keypair()[0].decode()  # any public key


async def _key_endpoint(port: int, ready: asyncio.Event, asked: list[bytes], answer_from: int | None) -> None:
    """A key endpoint that records each request's routing id and answers from the
    ``answer_from``-th request on (None: never)."""
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(f"tcp://127.0.0.1:{port + keys.KEYS_PORT_OFFSET}")
    ready.set()
    try:
        while True:
            peer, _body = await sock.recv_multipart()
            asked.append(peer)
            if answer_from is not None and len(asked) >= answer_from:
                await sock.send_multipart([peer, keys.KEY_REPLY_PREFIX + KEY.encode()])
    finally:
        sock.close(linger=0)


async def test_an_unanswered_key_request_is_asked_again_within_the_timeout() -> None:
    assert keys.valid_key(KEY)
    port = free_port_base()
    ready, asked = asyncio.Event(), []
    server = asyncio.create_task(_key_endpoint(port, ready, asked, answer_from=2))
    try:
        await ready.wait()
        ctx = zmq.asyncio.Context.instance()
        endpoint, key = await keys.broker_key(f"tcp://127.0.0.1:{port}", ctx, timeout=10.0)
        assert key == KEY and len(asked) == 2
        assert keys.pinned(endpoint) == KEY  # pinned on first use (loopback)
    finally:
        server.cancel()


async def test_a_silent_key_endpoint_is_asked_on_fresh_sockets_until_the_timeout() -> None:
    """Each attempt is a new connection with the request on it (a request on a cut
    connection is never answered); at the timeout the fetch gives up with None."""
    port = free_port_base()
    ready, asked = asyncio.Event(), []
    server = asyncio.create_task(_key_endpoint(port, ready, asked, answer_from=None))
    try:
        await ready.wait()
        ctx = zmq.asyncio.Context.instance()
        fetch = keys.fetch_key(f"tcp://127.0.0.1:{port}", ctx, timeout=1.5, attempt=0.4)
        assert await asyncio.wait_for(fetch, 10) is None  # it gives up (the outer bound only catches a hang)
        assert len(asked) >= 3 and len(set(asked)) == len(asked)  # asked again, each time from a new socket
    finally:
        server.cancel()
