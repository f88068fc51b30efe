"""How a broker stores a turn's messages and hears other brokers: its engine.

- ``LocalEngine`` (one broker, any Storage): the core's seqs are final; one
  ``storage.append`` a turn; fan-out is this broker's XPUB alone. Today's path.
- ``RedisEngine`` (several brokers on one Redis): a Lua script per room gives the seqs,
  stores, dedups (sender, cid) and PUBLISHes to the other brokers, atomically; each
  broker re-publishes on its XPUB what the others stored for rooms its clients are in,
  and presence and membership are shared (zchat.broker.engines.redis).

The loop calls ``store`` (raise: the core undoes the turn), ``after`` (once the
turn was carried out), ``drain`` (what other brokers did, into the next turn's
Outcome) and ``stop``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from zchat.core import Core, Outcome
from zchat.storage import Storage


class Engine(Protocol):
    """What the broker's loop needs of an engine (see the module's docstring)."""

    name: str

    async def start(self, core: Core) -> None: ...

    async def store(self, core: Core, out: Outcome) -> None: ...

    async def after(self, core: Core, out: Outcome) -> None: ...

    def drain(self, core: Core, now: float, out: Outcome) -> int: ...

    async def stop(self) -> None: ...


class LocalEngine:
    """One broker: the core numbers, storage keeps, the XPUB fans out."""

    name = "local"

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def start(self, core: Core) -> None:
        return None

    async def store(self, core: Core, out: Outcome) -> None:
        await self.storage.append(out.store, out.members)

    async def after(self, core: Core, out: Outcome) -> None:
        return None

    def drain(self, core: Core, now: float, out: Outcome) -> int:
        return 0

    async def stop(self) -> None:
        return None


def engine_for(storage: Storage, poke: Callable[[], None]) -> Engine:
    """The Redis engine on a Redis store, else the local one."""
    from zchat.storage.redis import RedisStorage

    if isinstance(storage, RedisStorage):
        from zchat.broker.engines.redis import RedisEngine

        return RedisEngine(storage, poke)
    return LocalEngine(storage)
