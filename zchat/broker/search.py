"""Answering ``search`` (a mixin of Broker): the core authorised it, storage finds the
lines, the core's ``may_read`` keeps them to the rooms the user may read."""

from __future__ import annotations

import logging

from zchat import protocol as p
from zchat.core import SearchQuery
from zchat.storage import SearchUnsupported

log = logging.getLogger(__package__)  # one logger for the whole broker: "zchat.broker"


class Searching:
    """The shell's side of search (a mixin of Broker: uses its core and storage)."""

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
        except Exception as exc:
            log.error("search %r failed: %r", req, exc)
            return p.Error(code=p.ErrorCode.INTERNAL, message="could not search; try again", rid=req.rid)
        mine = [m for m in found if not core.floor(query.name, m.room) or m.seq > core.floor(query.name, m.room)]
        return p.SearchReply(rid=req.rid, epoch=core.epoch, messages=mine, next=found.next)
