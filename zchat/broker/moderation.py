"""What moderation asks of the shell (a mixin of Broker): storing room settings with a
batch, tombstones, cutting the connections of a banned or released name, and releasing
a name's keys and storage row."""

from __future__ import annotations

import logging
import time

from zchat import auth
from zchat.core import Outcome, RoomChange
from zchat.storage import StorageError

log = logging.getLogger(__package__)  # one logger for the whole broker: "zchat.broker"


class Moderating:
    """Moderation's side effects outside the core (a mixin of Broker)."""

    async def _unstore_rooms(self, changes: list[RoomChange]) -> None:
        """The batch that went with these stored settings was refused: take them back."""
        try:
            await self.storage.change_rooms([(room, role, value, not on) for room, role, value, on in reversed(changes)])
        except StorageError as exc:
            log.error("could not take back %d room setting(s) after a refused batch: %r", len(changes), exc)

    async def _moderated(self, out: Outcome) -> None:
        """After the batch is stored: tombstones (before the delete lines are published, so
        a client that fetches history on seeing one gets the tombstone), then bans and
        releases of names."""
        for room, seq in out.tombstones:
            try:
                if not await self.storage.tombstone(room, seq):
                    log.info("line %d of %r was not a text line (or is gone): nothing to delete", seq, room)
            except StorageError as exc:
                log.error("could not delete line %d of %r: %r", seq, room, exc)
        for name in out.released:
            try:
                await self.storage.release_user(name)
            except StorageError as exc:
                log.error("could not release the name %r: %r", name, exc)
            self.digests.pop(name, None)
        for name in dict.fromkeys(out.cut):
            cut = self._cut_name(name)
            if name in out.released:
                for key in self.name_keys.pop(name, []):  # the squatter's keys are refused from now on
                    self.key_names.pop(key, None)
                    if len(self.revoked) < auth.MAX_REVOKED:
                        self.revoked.add(key)
                    try:  # stored, as a revocation by the owner is: refused after a restart too
                        await self.storage.set_revoked(key, True, time.time(), auth.MAX_REVOKED)
                    except StorageError as exc:
                        log.error("could not store the revocation of a released key of %r: %r", name, exc)
                log.info("name %r released by an admin (%d live connection(s) cut)", name, cut)
            else:
                log.info("%r banned from the broker (%d live connection(s) cut)", name, cut)

    def _cut_name(self, name: str) -> int:
        """Cut the live connections of every key of ``name``; how many."""
        return sum(self._cut_key(key) for key in self.name_keys.get(name, ()))
