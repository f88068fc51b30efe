"""History, users and memberships in one SQLite file, for a single broker.

Durability: WAL journal with ``synchronous=NORMAL``. A committed ``append`` survives
a crash or kill of the broker process; after an OS crash or power loss the last few
commits may be rolled back, but the file is never corrupted. Queries run synchronously
inside the async methods on purpose: they are sub-millisecond (the (room, seq) primary
key serves every history query) and a thread hop would cost more than it saves.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from pathlib import Path
from typing import Sequence

from zchat.protocol import Msg
from zchat.storage.base import StorageError

log = logging.getLogger(__name__)

_SQLITE_HEADER = b"SQLite format 3\x00"
_COLUMNS = "room, seq, id, ts, sender, kind, text, to_name, cid"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    ts REAL NOT NULL,
    sender TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    to_name TEXT NOT NULL,
    cid TEXT NOT NULL,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
-- Only rows with a cid, newest by ts: recent() reads this instead of scanning history.
CREATE INDEX IF NOT EXISTS messages_recent ON messages (ts) WHERE cid <> '';
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, digest BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    room TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (room, name)
) WITHOUT ROWID;
"""

# Skip from room to room along the primary key (a loose index scan): O(rooms * log n).
# The plain "SELECT room, MAX(seq) ... GROUP BY room" reads every row: 170 ms at 1M rows.
_HEADS_SQL = """
WITH RECURSIVE r(room) AS (
    SELECT MIN(room) FROM messages
    UNION ALL
    SELECT (SELECT MIN(room) FROM messages WHERE room > r.room) FROM r WHERE r.room IS NOT NULL
)
SELECT room, (SELECT MAX(seq) FROM messages WHERE messages.room = r.room) FROM r WHERE room IS NOT NULL
"""


def _row_to_msg(row: tuple) -> Msg:  # type: ignore[type-arg]
    room, seq, id_, ts, sender, kind, text, to_name, cid = row
    return Msg(room=room, seq=seq, id=id_, ts=ts, sender=sender, kind=kind, text=text, to=to_name, cid=cid)


class SqliteStorage:
    """The Storage interface on one SQLite file (see zchat.storage.base)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self.epoch = ""

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> str:
        """Create or open the file; refuse anything that is not an SQLite database."""
        self._check_header()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction
        # spans exactly what we say and nothing is left open between calls.
        conn = sqlite3.connect(str(self.path), isolation_level=None)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                log.warning("SQLite %s: journal_mode is %s, not wal", self.path, mode)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', ?) ON CONFLICT(key) DO NOTHING",
                (secrets.token_hex(8),),
            )
            self.epoch = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            raise StorageError(f"cannot open SQLite history {self.path}: {exc}") from exc
        self._conn = conn
        log.info("opened SQLite history %s (epoch %s)", self.path, self.epoch)
        return self.epoch

    def _check_header(self) -> None:
        """Refuse a non-SQLite file before sqlite3 gets a chance to write to it."""
        try:
            with self.path.open("rb") as fh:
                header = fh.read(len(_SQLITE_HEADER))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot read history file {self.path}: {exc}") from exc
        if header and header != _SQLITE_HEADER:
            raise StorageError(
                f"{self.path} exists but is not an SQLite database; refusing to overwrite it "
                "(move it away or choose another --db path)"
            )

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError("SQLite storage is not open")
        return self._conn

    # -------------------------------------------------------------- history

    async def append(self, messages: Sequence[Msg]) -> None:
        """Insert all messages in one transaction; a duplicate (room, seq) inserts none."""
        if not messages:
            return
        rows = [(m.room, m.seq, m.id, m.ts, m.sender, m.kind, m.text, m.to, m.cid) for m in messages]
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.IntegrityError):
                raise StorageError(f"refused {len(rows)} messages: (room, seq) already stored: {exc}") from exc
            raise StorageError(f"SQLite append failed: {exc}") from exc

    async def heads(self) -> dict[str, int]:
        return dict(self._db.execute(_HEADS_SQL))

    async def range(self, room: str, after: int, limit: int, before: int = 0) -> list[Msg]:
        if limit <= 0:
            return []
        upper = before if before > 0 else 2**63 - 1
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq > ? AND seq < ? ORDER BY seq LIMIT ?",
            (room, after, upper, limit),
        )
        return [_row_to_msg(row) for row in rows]

    async def last(self, room: str, limit: int, before: int = 0) -> list[Msg]:
        if limit <= 0:
            return []
        upper = before if before > 0 else 2**63 - 1
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (room, upper, limit),
        ).fetchall()
        return [_row_to_msg(row) for row in reversed(rows)]

    async def first_seq(self, room: str) -> int:
        row = self._db.execute("SELECT MIN(seq) FROM messages WHERE room = ?", (room,)).fetchone()
        return row[0] or 0

    async def recent(self, limit: int) -> list[Msg]:
        if limit <= 0:
            return []
        # "cid <> ''" must match the partial index's WHERE clause for it to be used.
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE cid <> '' ORDER BY ts DESC LIMIT ?", (limit,)
        ).fetchall()
        return [_row_to_msg(row) for row in reversed(rows)]

    # ---------------------------------------------------- users and members

    async def get_user(self, name: str) -> bytes | None:
        row = self._db.execute("SELECT digest FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    async def users(self) -> set[str]:
        return {name for (name,) in self._db.execute("SELECT name FROM users")}

    async def add_user(self, name: str, digest: bytes) -> bool:
        cur = self._db.execute(
            "INSERT INTO users (name, digest) VALUES (?, ?) ON CONFLICT(name) DO NOTHING", (name, digest)
        )
        return cur.rowcount == 1

    async def members(self) -> dict[str, set[str]]:
        result: dict[str, set[str]] = {}
        for room, name in self._db.execute("SELECT room, name FROM members"):
            result.setdefault(room, set()).add(name)
        return result

    async def set_member(self, room: str, name: str, member: bool) -> None:
        if member:
            self._db.execute(
                "INSERT INTO members (room, name) VALUES (?, ?) ON CONFLICT DO NOTHING", (room, name)
            )
        else:
            self._db.execute("DELETE FROM members WHERE room = ? AND name = ?", (room, name))
