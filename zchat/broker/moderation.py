"""What moderation asks of the shell (a mixin of Broker): storing room settings with a
batch, tombstones and edits, cutting the connections of a banned or released name, and
releasing a name's keys and storage row; and reading the line a sender edits."""

from __future__ import annotations

import collections
import logging
import time

from zchat import auth
from zchat import protocol as p
from zchat.core import EditQuery, Outcome, RoomChange
from zchat.storage import StorageError

log = logging.getLogger(__package__)  # one logger for the whole broker: "zchat.broker"

# Edits and deletes whose line is stored but whose change to the original line failed
# (storage down): retried on every tick until storage takes them. Both are idempotent
# and ordered (an edit only replaces an older one), so a late retry changes nothing else.
MAX_UNAPPLIED = 10_000


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
        changes = [(room, seq, text, by) for room, seq, text, by in out.edits]  # before the edit lines are published
        changes += [(room, seq, None, 0) for room, seq in out.tombstones]
        if changes:
            await self._change_lines(changes)
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

    async def _change_lines(self, changes: list[tuple[str, int, str | None, int]]) -> None:
        """Apply edits (text) and deletes (text None) to their original lines, in order;
        what storage refuses waits, with everything after it, for the next tick."""
        unapplied: collections.deque = self.unapplied
        unapplied.extend(changes)
        while unapplied:
            room, seq, text, by = unapplied[0]
            try:
                if text is None:
                    done = await self.storage.tombstone(room, seq)
                else:
                    done = await self.storage.edit(room, seq, text, by)
            except StorageError as exc:
                log.error("could not %s line %d of %r (%d change(s) wait for storage): %r",
                          "delete" if text is None else "edit", seq, room, len(unapplied), exc)
                while len(unapplied) > MAX_UNAPPLIED:
                    room, seq, text, _ = unapplied.popleft()
                    log.error("dropped the %s of line %d of %r: too many waiting (its line is in history)",
                              "delete" if text is None else "edit", seq, room)
                return
            unapplied.popleft()
            if not done:
                log.info("line %d of %r was not %s (gone, deleted, not a text line, or edited later)",
                         seq, room, "deleted" if text is None else "edited")

    async def _retry_changes(self) -> None:
        """The tick: edits and deletes storage refused before, if any."""
        if self.unapplied:
            await self._change_lines([])

    async def _edit_line(self, query: EditQuery) -> None:
        """Read the line an edit or delete names, let the core check its sender, and
        carry out what it decided (the edit line, the change, the reply)."""
        req = query.request
        try:
            page = await self.storage.range(req.room, req.seq - 1, 1)
        except Exception as exc:
            log.error("reading line %d of %r for an edit failed: %r", req.seq, req.room, exc)
            out = Outcome()
            out.error(query.sid, p.ErrorCode.INTERNAL, "could not read that line; try again", rid=req.rid)
        else:
            out = Outcome()
            self.core.edit_found(query, page[0] if page and page[0].seq == req.seq else None, time.monotonic(), out)
        await self._apply(out)

    def _cut_name(self, name: str) -> int:
        """Cut the live connections of every key of ``name``; how many."""
        return sum(self._cut_key(key) for key in self.name_keys.get(name, ()))
