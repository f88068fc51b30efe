"""The gateway's listening side: accepts IRC connections (plain TCP or TLS) and gives
each a Connection; keeps what outlives a connection (read positions per user)."""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl

from zchat.irc.gateway import Connection
from zchat.irc.signin import Gatekeeper

log = logging.getLogger(__name__)

#: IRC connections the gateway takes at once (each holds a zchat Client: two sockets).
MAX_CONNECTIONS = 1000
#: IRC connections the gateway takes from one address at once.
MAX_PER_ADDRESS = 64
#: Users whose read positions are kept after they disconnect (the oldest go first).
MAX_REMEMBERED = 10_000
#: History lines played back on JOIN by default.
DEFAULT_HISTORY = 50


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


class Gateway:
    """``zchat irc``: IRC clients in, one zchat Client each out to ``broker``.

    When a user reconnects, their new Client starts from the read positions
    (``Client.cursors()``) their last connection ended with, so a JOIN after a
    reconnect delivers what was missed and nothing shown before.
    """

    def __init__(
        self, broker: str, gatekeeper: Gatekeeper, *, history: int = DEFAULT_HISTORY, server_name: str = "zchat",
        network: str = "zchat", max_connections: int = MAX_CONNECTIONS, max_per_address: int = MAX_PER_ADDRESS,
    ) -> None:
        self.broker = broker
        self.gatekeeper = gatekeeper
        self.history = history
        self.server_name = server_name
        self.network = network
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self._per_address: collections.Counter[str] = collections.Counter()
        self.connections: set[Connection] = set()
        self._cursors: collections.OrderedDict[str, dict[str, tuple[str, int]]] = collections.OrderedDict()
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()  # one a connection, until its Client has closed

    def cursors_of(self, name: str) -> dict[str, tuple[str, int]] | None:
        return self._cursors.get(name)

    def keep_cursors(self, name: str, cursors: dict[str, tuple[str, int]]) -> None:
        self._cursors[name] = cursors
        self._cursors.move_to_end(name)
        while len(self._cursors) > MAX_REMEMBERED:
            self._cursors.popitem(last=False)

    async def start(self, host: str = "127.0.0.1", port: int = 6667, tls: ssl.SSLContext | None = None) -> int:
        """Listen; returns the port (useful with port 0)."""
        self._server = await asyncio.start_server(self._accept, host, port, ssl=tls)
        bound = self._server.sockets[0].getsockname()[1]
        log.info("IRC gateway listening on %s:%d%s for the broker %s", host, bound, " (TLS)" if tls else "", self.broker)
        return bound

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= self.max_connections:
            writer.write(b"ERROR :Too many connections to this gateway\r\n")
            writer.close()
            return
        conn = Connection(self, reader, writer)
        if self._per_address[conn.address] >= self.max_per_address:
            log.info("refused a connection from %s: %d open from there", conn.address, self.max_per_address)
            writer.write(b"ERROR :Too many connections from your address\r\n")
            writer.close()
            return
        self._per_address[conn.address] += 1
        self.connections.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await conn.run()
        except Exception:
            log.exception("IRC connection from %s failed", conn.address)
        finally:
            self.connections.discard(conn)
            self._per_address[conn.address] -= 1
            if self._per_address[conn.address] <= 0:
                del self._per_address[conn.address]
            self._handlers.discard(task)  # type: ignore[arg-type]

    async def serve_forever(self) -> None:
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and close every connection; each Client says bye to the broker
        (within ``timeout`` in all)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            await conn.quit("The gateway is shutting down")
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=timeout)
        if self._server is not None:
            await self._server.wait_closed()
