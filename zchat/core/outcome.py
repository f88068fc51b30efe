"""What the core hands back to the shell: an ``Outcome`` to carry out and the history
queries it authorised (plain values, so every part of the core can fill them)."""

from __future__ import annotations

import dataclasses

from zchat import protocol as p

#: A change of a room's settings: (room, role, value, on). Roles: "private" (value "1"),
#: "op", "ban", "invite" (a name each), "topic" (the text); room BROKER_SCOPE holds the
#: broker-wide bans. Stored with Storage.change_rooms, loaded with rooms_state.
RoomChange = tuple[str, str, str, bool]
BROKER_SCOPE = "$"


@dataclasses.dataclass(frozen=True)
class HistoryQuery:
    """A history request the core has authorised; the shell runs it against storage."""

    sid: str
    request: p.History
    head: int
    floor: int = 0  # lines up to this seq are an earlier owner's of the reader's name (a DM): left out


@dataclasses.dataclass(frozen=True)
class SearchQuery:
    """A search the core has authorised for user ``name``; the shell runs it against
    storage and keeps the lines of the rooms ``Core.may_read(name, room)`` allows."""

    sid: str
    request: p.Search
    name: str


@dataclasses.dataclass(frozen=True)
class EditQuery:
    """An edit or delete the core let through so far: the shell reads the line and hands
    it to ``Core.edit_found``, which checks its sender."""

    sid: str
    request: p.Edit | p.Delete
    name: str


@dataclasses.dataclass
class Outcome:
    """What the shell must do, in this order: store, persist members, publish, reply.

    If storing ``store`` fails, the shell calls ``Core.undo(outcome)`` and then carries
    out what is left (undo rewrites it).
    """

    store: list[p.Msg] = dataclasses.field(default_factory=list)
    members: list[tuple[str, str, bool]] = dataclasses.field(default_factory=list)
    publish: list[tuple[bytes, p.Msg | p.Presence | p.Notice | p.Retopic]] = dataclasses.field(default_factory=list)
    replies: list[tuple[str, p.Reply]] = dataclasses.field(default_factory=list)
    acks: dict[str, list[p.Stored]] = dataclasses.field(default_factory=dict)
    queries: list[HistoryQuery | SearchQuery | EditQuery] = dataclasses.field(default_factory=list)
    # Indexes into ``replies`` of the replies to joins and parts that changed membership:
    # undo turns them into errors.
    changed: list[int] = dataclasses.field(default_factory=list)
    # Users whose first session on this broker opened (True) or last one closed (False):
    # the several-broker engine tells the other brokers (zchat.broker.engines).
    went: list[tuple[str, bool]] = dataclasses.field(default_factory=list)
    # Moderation (zchat.core.moderation): room settings to store before the batch, lines
    # (room, seq) to replace by a tombstone after it, names whose connections to cut
    # (banned or released) and names to release in storage.
    room_changes: list[RoomChange] = dataclasses.field(default_factory=list)
    tombstones: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    # Edits (zchat.core.edits): (room, seq, new text, seq of the edit line), applied to
    # the stored line after the batch (with its edit line) is stored.
    edits: list[tuple[str, int, str, int]] = dataclasses.field(default_factory=list)
    cut: list[str] = dataclasses.field(default_factory=list)
    released: list[str] = dataclasses.field(default_factory=list)
    # Replies that may wait for the shell's next tick (pongs to lazy pings), made on the
    # first: most turns have none, and a list per turn is not free.
    later: list[tuple[str, p.Reply]] | None = None
    # Refusals of big lines (guard.Refusals weighs them): id() of an Error in ``replies``
    # -> the tokens its line would have cost. An identity map, not a wire field: the
    # Error object stays in ``replies`` for the turn. Made on the first such refusal.
    weights: dict[int, float] | None = None

    def weigh(self, err: p.Error, weight: float) -> None:
        """Say that refusal ``err`` weighs ``weight`` refusals (a line of that many tokens)."""
        if self.weights is None:
            self.weights = {}
        self.weights[id(err)] = weight

    def error(self, sid: str, code: str, message: str, *, rid: int = 0, cid: str = "", retry_after: float = 0.0) -> None:
        self.replies.append((sid, p.Error(code=code, message=message, rid=rid, cid=cid, retry_after=retry_after)))
