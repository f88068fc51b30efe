"""Answering ``search`` (a mixin of Broker): the core authorised it, storage finds the
lines, the core's ``may_read`` keeps them to the rooms the user may read."""

from __future__ import annotations

import asyncio
import logging

from zchat import protocol as p
from zchat.core import SearchQuery
from zchat.sockio import send_parts
from zchat.storage import SearchUnsupported, StorageUnavailable

log = logging.getLogger(__package__)  # one logger for the whole broker: "zchat.broker"


#: Searches waiting for the store at once (each waits for the search index to have every
#: line stored before it); past this, more are refused ``rate_limited`` for a moment.
MAX_SEARCHING = 32
SEARCHING_RETRY = 1.0


class Searching:
    """The shell's side of search (a mixin of Broker: uses its core and storage).

    A search runs in a task of its own, not in the loop's turn: the store may first wait
    for its index (SqliteStorage: a thread) to reach the lines stored before it, and the
    loop must not wait with it. The task leaves its reply in ``searched``; the loop, the
    one user of the ROUTER, sends it (``_send_searched``)."""

    searched: list[tuple[str, bytes]]
    searching: set

    def _search_later(self, query: SearchQuery) -> None:
        if len(self.searching) >= MAX_SEARCHING:
            body: p.Error = p.Error(
                code=p.ErrorCode.RATE_LIMITED, message="the broker is busy searching; try again", rid=query.request.rid,
                retry_after=SEARCHING_RETRY,
            )
            self.searched.append((query.sid, p.encode(body)))
            return
        task = asyncio.ensure_future(self._search_task(query))
        self.searching.add(task)
        task.add_done_callback(self.searching.discard)

    async def _search_task(self, query: SearchQuery) -> None:
        try:
            body = await self._answer_search(query)
        except Exception as exc:  # never lose the answer: the client would wait for its timeout
            log.error("search %r failed: %r", query.request, exc)
            body = p.Error(code=p.ErrorCode.INTERNAL, message="could not search; try again", rid=query.request.rid)
        self.searched.append((query.sid, p.encode(body)))
        self._poke()  # type: ignore[attr-defined]

    def _send_searched(self) -> None:
        """The loop sends the replies its search tasks left."""
        replies, self.searched = self.searched, []
        for sid, data in replies:
            send_parts(self.router, [sid.encode("latin-1"), data])  # type: ignore[attr-defined]

    async def _answer_search(self, query: SearchQuery) -> p.SearchReply | p.Error:
        req, core = query.request, self.core
        assert core is not None
        try:
            found = await self.storage.search(
                req.text, req.limit, req.before, req.room, readable=lambda room: core.may_read(query.name, room),
                max_bytes=p.MAX_REPLY_BYTES - 1024,  # the reply's envelope
            )
        except SearchUnsupported as exc:
            return p.Error(code=p.ErrorCode.NOT_SUPPORTED, message=str(exc), rid=req.rid)
        except StorageUnavailable as exc:  # the index is behind (or closing): the user may try again
            log.warning("search %r: %s", req, exc)
            return p.Error(code=p.ErrorCode.STORAGE_UNAVAILABLE, message=f"could not search now: {exc}", rid=req.rid)
        except Exception as exc:
            log.error("search %r failed: %r", req, exc)
            return p.Error(code=p.ErrorCode.INTERNAL, message="could not search; try again", rid=req.rid)
        mine = [m for m in found if not core.floor(query.name, m.room) or m.seq > core.floor(query.name, m.room)]
        return p.SearchReply(rid=req.rid, epoch=core.epoch, messages=mine, next=found.next)
