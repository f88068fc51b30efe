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


async def _endpoint_that_drops_the_first(port: int, ready: asyncio.Event, asked: list[bytes]) -> None:
    """A key endpoint that never answers the first request it reads, then answers."""
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(f"tcp://127.0.0.1:{port + keys.KEYS_PORT_OFFSET}")
    ready.set()
    try:
        while True:
            peer, body = await sock.recv_multipart()
            asked.append(body)
            if len(asked) > 1:
                await sock.send_multipart([peer, keys.KEY_REPLY_PREFIX + KEY.encode()])
    finally:
        sock.close(linger=0)


async def test_an_unanswered_key_request_is_asked_again_within_the_timeout() -> None:
    assert keys.valid_key(KEY)
    port = free_port_base()
    ready, asked = asyncio.Event(), []
    server = asyncio.create_task(_endpoint_that_drops_the_first(port, ready, asked))
    try:
        await ready.wait()
        ctx = zmq.asyncio.Context.instance()
        endpoint, key = await keys.broker_key(f"tcp://127.0.0.1:{port}", ctx, timeout=10.0)
        assert key == KEY and len(asked) == 2
        assert keys.pinned(endpoint) == KEY  # pinned on first use (loopback)
    finally:
        server.cancel()


async def test_a_silent_key_endpoint_is_waited_for_no_longer_than_the_timeout() -> None:
    port = free_port_base()
    ctx = zmq.asyncio.Context.instance()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await keys.fetch_key(f"tcp://127.0.0.1:{port}", ctx, timeout=1.5, attempt=0.4) is None
    assert 1.4 <= loop.time() - started < 5.0
