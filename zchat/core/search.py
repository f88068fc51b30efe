"""Who may find what: the core's side of ``search`` (sans I/O). The core checks the
request, takes a token from the user's search budget and hands the shell a
SearchQuery; the shell runs it against storage, keeping only the lines of rooms
``may_read`` allows (so a private room's lines never reach a non-member)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from zchat import protocol as p
from zchat.core.outcome import SearchQuery
from zchat.protocol import ErrorCode as E

if TYPE_CHECKING:
    from zchat.core.outcome import Outcome


class Searching:
    """Core's search checks (a mixin of Core: reads its members, private rooms, limits)."""

    def may_read(self, name: str, room: str) -> bool:
        """Public rooms: anyone; a private room: its members; a DM conversation: its two users."""
        peers = p.dm_peers(room)
        if peers is not None:
            return name in peers
        if room in self.private:
            return name in self.members.get(room, ())
        return not p.is_dm_room(room)

    def _search(self, sid: str, name: str, req: p.Search, now: float, out: Outcome) -> None:
        if not req.text.strip():
            out.error(sid, E.BAD_REQUEST, "search for at least one word", rid=req.rid)
            return
        if req.room and not self._readable(sid, name, req.room, req.rid, out):
            return
        if not self._search_budget(sid, name, now, out, req.rid):
            return
        out.queries.append(SearchQuery(sid, req, name))

    def _search_budget(self, sid: str, name: str, now: float, out: Outcome, rid: int) -> bool:
        """A search reads far more than a history page: a bucket of its own, on top of
        the request budget."""
        lim = self.limits
        return self._kind_budget(
            self.search_buckets, lim.search_rate, lim.search_burst, "searches_limited", "too many searches",
            sid, name, now, out, rid,
        )
