"""The storage interface the broker writes history, users and memberships through.

Small on purpose: the broker core assigns sequence numbers and message ids; storage
only keeps what it is given, durably, and answers range queries. SQLite (one broker)
and Redis (several brokers) implement it and pass one shared test suite
(tests/integration/test_storage.py).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from zchat.protocol import Msg

#: A membership change: (room, name, member?) — stored with the batch that made it.
MemberChange = tuple[str, str, bool]
#: A change of a room's settings: (room, role, value, on) — see zchat.core.outcome.
RoomChange = tuple[str, str, str, bool]
#: The kinds of line a tombstone may replace (not joins, parts or moderation lines).
TOMBSTONED_KINDS = ("text", "me")


class StorageError(Exception):
    """Storage refused or failed an operation (for example a (room, seq) already stored)."""


class StorageUnavailable(StorageError):
    """The store cannot take writes now (disk full, file read-only, I/O error, server
    gone): not the request's fault, and likely to pass. The broker refuses sends with
    ``storage_unavailable`` while it lasts and keeps serving reads."""


class Page(list[Msg]):
    """Messages a history query returned; ``cut`` when the byte budget stopped it
    before ``limit`` (ask again from the last seq given)."""

    cut: bool = False


def msg_bytes(msg: Msg) -> int:
    """About what a message costs encoded: its text plus the fixed fields."""
    return len(msg.text.encode()) + 128


class Storage(Protocol):
    async def open(self) -> str:
        """Create or open the store; return its history epoch.

        The epoch is a random string made when the store is first created and kept
        for its lifetime: a new epoch tells clients that earlier history is gone.
        """

    async def close(self) -> None: ...

    async def append(self, messages: Sequence[Msg], members: Sequence[MemberChange] = ()) -> None:
        """Store messages and membership changes atomically (all or none), durable when
        this returns: a join line is never stored without its membership, or the other way.

        Raises StorageError if any (room, seq) is already stored.
        """

    async def heads(self) -> dict[str, int]:
        """Highest stored seq of every room (0 for none)."""

    async def range(self, room: str, after: int, limit: int, before: int = 0, max_bytes: int = 0) -> Page:
        """Messages with after < seq (< before when before > 0), oldest first, at most limit
        and (when max_bytes > 0) at most about max_bytes by msg_bytes, but never none if any match."""

    async def last(self, room: str, limit: int, before: int = 0, max_bytes: int = 0) -> Page:
        """The newest ``limit`` messages (with seq < before when before > 0), oldest first;
        a byte budget keeps the newest that fit (at least one)."""

    async def first_seq(self, room: str) -> int:
        """Lowest seq still stored for room (0 when empty); shows what was trimmed."""

    async def recent(self, limit: int) -> list[Msg]:
        """The newest ``limit`` messages over all rooms that carry a cid (for dedup warm-up)."""

    async def get_user(self, name: str) -> bytes | None:
        """The stored secret digest for name, or None if the name is free."""

    async def users(self) -> set[str]:
        """Every claimed name (so a broker that restarts knows who may get DMs)."""

    async def add_user(self, name: str, digest: bytes) -> bool:
        """Claim name with digest; False if it was already claimed (the first owner wins)."""

    async def members(self) -> dict[str, set[str]]:
        """Every room's (and DM conversation's) members."""

    async def set_member(self, room: str, name: str, member: bool) -> None:
        """Add (member=True) or remove name from room's members."""

    async def release_user(self, name: str, digest: bytes | None = None) -> bool:
        """Free a claimed name (given ``digest``: only while it is still that digest's).

        The broker releases a name whose claiming handshake never said hello in time,
        so a claim alone cannot squat a name; True if the name was removed.
        """

    async def add_invite(self, code: str, expires: float, now: float, limit: int) -> bool:
        """Keep the one-use invite ``code`` until ``expires`` (wall-clock seconds); codes
        expired by ``now`` are dropped first. False when ``limit`` unexpired codes are
        kept already (or ``code`` is): the cap holds across restarts."""

    async def use_invite(self, code: str, now: float) -> float:
        """Take ``code`` if it is kept and unexpired, in one step: of two claims racing
        for one code, one gets its expiry and the other 0.0 (as for a used, expired or
        made-up code). A caller whose claim then fails gives it back with add_invite."""

    async def invites(self, now: float) -> int:
        """How many unexpired invite codes are kept (for status and tests)."""

    async def set_revoked(self, key: bytes, revoked: bool, now: float, limit: int) -> None:
        """Remember (``revoked``) or forget that the raw public ``key`` was revoked, so a
        broker that restarts still refuses it. Keeps the ``limit`` newest revocations."""

    async def revoked_keys(self) -> set[bytes]:
        """Every remembered revoked key (at most the ``limit`` given to set_revoked)."""

    async def change_rooms(self, changes: Sequence[RoomChange]) -> None:
        """Apply room-setting changes in order, all or none: (room, role, value, True)
        adds value to the room's role, False takes it away."""

    async def rooms_state(self) -> dict[str, dict[str, set[str]]]:
        """Every room's settings: room -> role -> values (no empty sets)."""

    async def tombstone(self, room: str, seq: int) -> bool:
        """Replace line ``seq`` of ``room`` by its tombstone: kind ``deleted``, no text,
        everything else kept. Only a text or /me line; False if there is none to replace."""

    async def prune(self, room: str, keep: int = 0, before_ts: float = 0.0, batch: int = 500) -> int:
        """Delete up to ``batch`` of room's oldest messages that retention lets go: those
        beyond the newest ``keep`` (when keep > 0) and those stamped before ``before_ts``
        (when before_ts > 0). The room's newest message always stays, so its head (and
        the next seq) survives a restart. Returns how many were deleted (0: nothing due).
        Small batches keep each call short; the caller loops with pauses in between."""
