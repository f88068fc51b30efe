"""The broker process: a thin asyncio shell around zchat.core.

One task owns every socket. It waits on a poller, drains whatever is ready without
blocking (so one client can never stall the others), feeds the core, then carries
out the core's Outcome: store (one transaction per batch), publish, reply.

Sockets (all CURVE-encrypted and authenticated through the ZAP handler, zchat.broker.zap):
  ROUTER  port P    requests and replies, acks and errors for chat lines
  PULL    port P+1  chat lines from the clients' PUSH
  XPUB    port P+2  fan-out; XPUB_MANUAL so each subscription is authorised
  ROUTER  port P+3  plain and unauthenticated: answers its public key only (for
                    clients pinning the broker on first use), in a thread of its own

The package, one file per concern: loop (the Broker, its turns, applying an Outcome),
startup, zap (authentication, claims), edge (claim/invite/key requests), inputs
(subscriptions, requests, chat lines), moderation (tombstones, cutting banned names),
outage (rate-limited logging) and constants.
"""

from __future__ import annotations

import asyncio
from typing import Any

from zchat.broker.constants import (
    BATCH,
    EDGE_REQUESTS,
    MAX_PUBLICATION_BYTES,
    ZAP_DOMAIN,
    ZAP_ENDPOINT,
)
from zchat.broker.loop import Broker
from zchat.broker.outage import RateLimitedLog, StorageOutage
from zchat.broker.startup import split_endpoint
from zchat.core import Limits
from zchat.guard import GuardConfig
from zchat.retention import Retention, RetentionPolicy
from zchat.storage import Storage

__all__ = [
    "BATCH", "EDGE_REQUESTS", "MAX_PUBLICATION_BYTES", "ZAP_DOMAIN", "ZAP_ENDPOINT",
    "Broker", "RateLimitedLog", "StorageOutage", "serve", "split_endpoint",
]

async def serve(
    bind: str, storage: Storage, limits: Limits = Limits(), guard: GuardConfig | None = None,
    retention: RetentionPolicy | None = None, metrics: str | None = None, metrics_public: bool = False, **security: Any,
) -> None:
    """Run a broker until SIGINT or SIGTERM (with retention pruning beside it, if asked);
    with ``metrics`` (HOST:PORT) also serve Prometheus metrics there (zchat.metrics),
    from a thread of their own. ``security``: Broker's key_dir, registration, admins."""
    import signal

    broker = Broker(bind, storage, limits, guard=guard, **security)
    server = None
    if metrics:
        from zchat.metrics import start_metrics

        # Before the broker binds: a flood of connections at start-up can take every
        # descriptor, and the metrics port and prometheus-client's imports need some.
        server = start_metrics(broker, metrics, metrics_public)
    try:
        await broker.start()
    except BaseException:
        if server is not None:
            server.close()
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, broker.stop)
    pruner = None
    if retention and retention.active:
        broker.retention = Retention(storage, retention)  # its counts are metrics
        pruner = asyncio.create_task(broker.retention.run())

    async def stop_pruning() -> None:  # before run() closes the storage it prunes
        await broker.stopping.wait()
        if pruner is not None:
            pruner.cancel()

    stopper = asyncio.create_task(stop_pruning())
    try:
        await broker.run()
    finally:
        stopper.cancel()
        if pruner is not None:
            pruner.cancel()
        if server is not None:
            server.close()
