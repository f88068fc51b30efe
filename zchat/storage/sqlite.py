"""History, users and memberships in one SQLite file, for a single broker.

Durability: WAL journal with ``synchronous=NORMAL``. A committed ``append`` survives
a crash or kill of the broker process; after an OS crash or power loss the last few
commits may be rolled back, but the file is never corrupted. Such a rollback would
hand out seqs that clients already saw, so it is detected instead: ``open`` records the
machine's boot id in ``meta.running`` with a synchronous (fsynced) commit and ``close``
clears it; a file found still "running" under another boot id was open when the machine
went down, and gets a new epoch (clients then start afresh rather than take new messages
for ones they have seen). That costs one fsync per start and nothing per message; a kill
of the process alone (same boot) keeps the epoch, since its commits are all in the WAL. Queries run synchronously
inside the async methods on purpose: they are sub-millisecond (the (room, seq) primary
key serves every history query) and a thread hop would cost more than it saves.

Checkpoints (copying the WAL back into the main file, and fsyncs) stay off the broker's
thread. Its connection has ``wal_autocheckpoint=0``; a daemon thread with a connection
of its own runs a PASSIVE checkpoint, which never blocks the writer, once the broker
wrote about CHECKPOINT_BYTES or CHECKPOINT_EVERY seconds after a write, whichever comes
first (rarely: the commit after a full checkpoint syncs the WAL header on the broker's
thread). SQLite starts the WAL over only when a
write begins with every frame copied, which back-to-back commits can keep from ever
happening: once the WAL passes WAL_LIMIT_BYTES, the thread copies until little is left
and the broker's thread runs one PASSIVE checkpoint right after a commit, copying that
little, so the next write starts the WAL over. ``close`` stops the thread and truncates
the WAL, leaving a self-contained file. Checkpoints never decide durability: a commit is
durable once it is in the WAL, checkpointed or not.
"""

from __future__ import annotations

import heapq
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Sequence

from zchat.protocol import Msg
from zchat.storage.base import (
    MAX_SEARCH_SCAN,
    TOMBSTONED_KINDS,
    Found,
    MemberChange,
    Page,
    RoomChange,
    SearchUnsupported,
    StorageError,
    StorageUnavailable,
    search_terms,
)

from zchat.storage.sqlite_search import REDO_SCHEMA, REDO_SQL, TRIM_SQL, SearchIndex, search_rows

log = logging.getLogger(__name__)

_SQLITE_HEADER = b"SQLite format 3\x00"
_COLUMNS = "room, seq, id, ts, sender, kind, text, to_name, cid, ref, edited"

#: Most seconds between background checkpoints while there are writes... A line a
#: transaction rewrites the same pages over and over; a checkpoint copies each page once
#: and fsyncs once. And each checkpoint that copies the whole WAL makes the broker's next
#: commit start the WAL over, and SQLite syncs the new WAL header then, even at
#: synchronous=NORMAL (ticket ff5be73dee): an fdatasync on the broker's thread, in front
#: of everyone (several ms on a VM, tens while the disk flushes a checkpoint). Every 0.25 s
#: that was 3-4 such syncs a second at 10 lines a second; every 2 s, one in 2 s.
CHECKPOINT_EVERY = 2.0
#: ...or sooner, once the broker wrote about this much to the WAL since the last one
#: (estimated: its lines' text and CHECKPOINT_PAGES pages a commit).
CHECKPOINT_BYTES = 4 * 1024 * 1024
#: The pages a commit is counted as besides its text (a table leaf, index leaves, meta).
CHECKPOINT_PAGES = 4
#: A WAL that has not started over by this size gets a checkpoint on the broker's thread...
WAL_LIMIT_BYTES = 16 * 1024 * 1024
#: ...once a background checkpoint had no more than this to copy (so the broker's is short).
HANDOFF_BYTES = 1024 * 1024
#: Seconds close() waits for a checkpoint in progress before closing without it.
CHECKPOINTER_JOIN_TIMEOUT = 5.0

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
    ref INTEGER NOT NULL DEFAULT 0,
    edited INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, digest BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    room TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (room, name)
) WITHOUT ROWID;
-- Invite codes (one use, until expires) and revoked keys, kept across restarts.
CREATE TABLE IF NOT EXISTS invites (code TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revoked (key BLOB PRIMARY KEY, ts REAL NOT NULL) WITHOUT ROWID;
-- Room settings: private, op, ban, invite, topic (room '$' holds broker-wide bans).
CREATE TABLE IF NOT EXISTS room_roles (
    room TEXT NOT NULL,
    role TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (room, role, value)
) WITHOUT ROWID;
-- Earlier versions kept a partial index on ts for recent(), at a cost to every insert.
DROP INDEX IF EXISTS messages_recent;
"""

def fts_query(text: str) -> str:
    """``text`` as an FTS5 query: every word quoted (no FTS syntax gets through), all
    of them required, ``word*`` a prefix."""
    return " ".join('"' + word.replace('"', '""') + '"' + ("*" if prefix else "") for word, prefix in search_terms(text))


_INSERT_SQL = f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_JOIN_SQL = "INSERT INTO members (room, name) VALUES (?, ?) ON CONFLICT DO NOTHING"
_LEAVE_SQL = "DELETE FROM members WHERE room = ? AND name = ?"

# Skip from room to room along the primary key (a loose index scan): O(rooms * log n).
# The plain "SELECT room, MAX(seq) ... GROUP BY room" reads every row: 170 ms at 1M rows.
_ROOMS_CTE = """
WITH RECURSIVE r(room) AS (
    SELECT MIN(room) FROM messages
    UNION ALL
    SELECT (SELECT MIN(room) FROM messages WHERE room > r.room) FROM r WHERE r.room IS NOT NULL
)
"""
_HEADS_SQL = _ROOMS_CTE + """
SELECT room, (SELECT MAX(seq) FROM messages WHERE messages.room = r.room) FROM r WHERE room IS NOT NULL
"""

# Every room's newest message with a cid (NULL if none): nothing older in it can beat it.
_NEWEST_SQL = _ROOMS_CTE + """
SELECT (SELECT ts FROM messages WHERE messages.room = r.room AND cid <> '' ORDER BY seq DESC LIMIT 1), room
FROM r WHERE room IS NOT NULL
"""
# One room's messages with a cid, newest first, walking the primary key backwards.
_ROOM_RECENT_SQL = (
    f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq < ? AND cid <> '' ORDER BY seq DESC LIMIT ?"
)
_BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
_Row = tuple[Any, ...]
_MAX_SEQ = 2**63 - 1
_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def boot_id() -> str:
    """This boot of the machine ("" where the OS does not say: a restart then keeps the epoch)."""
    try:
        return _BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


def _row_to_msg(row: _Row) -> Msg:
    room, seq, id_, ts, sender, kind, text, to_name, cid, ref, edited = row
    return Msg(room=room, seq=seq, id=id_, ts=ts, sender=sender, kind=kind, text=text, to=to_name, cid=cid, ref=ref, edited=edited)


def _page(rows: Any, max_bytes: int) -> Page:
    """Rows read one at a time (never all of them at once) into a Page within max_bytes."""
    page = Page()
    size = 0
    for row in rows:
        size += len(row[6].encode()) + 128  # storage.base.msg_bytes, on the row
        if max_bytes and size > max_bytes and page:
            page.cut = True
            break
        page.append(_row_to_msg(row))
    return page


class _Checkpointer(threading.Thread):
    """Runs PASSIVE checkpoints on its own connection while the broker writes.

    Shares plain attributes with the broker's thread (the GIL orders them): ``written``
    (bumped by the broker after each write), ``idle`` and ``wake`` (to sleep without
    polling while nothing is written), and ``request`` (set here, served by the broker's
    thread: "catch-up" for one checkpoint there, "autocheckpoint" to hand checkpoints back
    to SQLite when this thread cannot do them). It never touches the broker's connection.
    """

    MAX_FAILURES = 3
    MAX_HURRIES = 3

    def __init__(self, path: Path, sync_fd: int | None) -> None:
        super().__init__(name=f"sqlite-checkpoint {path.name}", daemon=True)
        self.path = path
        self.sync_fd = sync_fd  # the main file, opened (and closed) by SqliteStorage
        self.written = 0
        # Bytes the broker estimates it wrote to the WAL since the last checkpoint began
        # (its thread adds, this one zeroes: a lost update only moves one checkpoint).
        self.pending = 0
        self.idle = False
        self.request: str | None = None
        self.wake = threading.Event()
        self.stopping = False
        self.checkpoints = 0  # completed in this thread
        self.catch_ups = 0  # checkpoints the broker's thread ran for it

    def stop(self, timeout: float) -> bool:
        """Ask the thread to finish; True if it did within timeout."""
        self.stopping = True
        self.wake.set()
        self.join(timeout)
        return not self.is_alive()

    def run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._loop(conn)
        except Exception:
            log.exception("SQLite %s: checkpoint thread failed; SQLite checkpoints inside commits again", self.path)
            self.request = "autocheckpoint"
        finally:
            if conn is not None:
                conn.close()

    def _gather(self) -> bool:
        """Wait until the broker wrote CHECKPOINT_BYTES or CHECKPOINT_EVERY passed (the
        broker sets ``wake`` when the bytes are there); True: stop instead."""
        deadline = time.monotonic() + CHECKPOINT_EVERY
        while self.pending < CHECKPOINT_BYTES and not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.wake.wait(left)
            self.wake.clear()
        return self.stopping

    def _sync(self) -> None:
        """Flush what our checkpoints copied into the main file (see _loop)."""
        if self.sync_fd is None:
            return
        try:
            _fdatasync(self.sync_fd)
        except OSError as exc:  # then the checkpoint that reaches the WAL's end flushes it all
            log.warning("SQLite %s: cannot fsync from the checkpoint thread: %s", self.path, exc)
            self.sync_fd = None

    def _loop(self, conn: sqlite3.Connection) -> None:
        done = 0  # self.written when the last checkpoint started
        last = 0  # the WAL's length in frames when the last checkpoint started
        failures = hurries = 0
        frame_bytes = conn.execute("PRAGMA page_size").fetchone()[0] + 24
        while True:
            self.wake.clear()
            if self.stopping:
                break
            if self.request is not None:  # the broker's turn; it sets wake when done
                self.wake.wait(CHECKPOINT_EVERY)
                continue
            if self.written == done:
                self.idle = True  # the broker sets wake on its next write
                if self.written == done:
                    self.wake.wait()
                self.idle = False
                continue
            # Let writes gather, then copy them back in one go.
            if not hurries and self._gather():
                break
            done = self.written
            self.pending = 0
            try:
                # frames: the WAL's length when the checkpoint began, all of it copied
                # unless busy. It only shrinks when a write begins with nothing left to
                # copy, which steady writes can keep from happening.
                busy, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                failures += 1
                log.warning("SQLite %s: background checkpoint failed (%d in a row): %s", self.path, failures, exc)
                if failures >= self.MAX_FAILURES:
                    raise
                done, hurries = -1, 0  # try again after the next pause
                continue
            failures = 0
            self.checkpoints += 1
            if frames > 0:
                # SQLite fsyncs the main file only in a checkpoint that reaches the end of
                # the WAL, which the broker's writes keep moving: that one (perhaps the
                # broker's catch-up) would flush every copy made before it. Flush ours now.
                self._sync()
            if busy:
                done = -1
                continue
            # Frames written since the previous checkpoint began (fewer frames: the WAL restarted).
            fresh, last = (frames - last if frames >= last else frames), frames
            if frames * frame_bytes <= WAL_LIMIT_BYTES:
                hurries = 0
            elif fresh * frame_bytes > HANDOFF_BYTES and hurries < self.MAX_HURRIES:
                hurries += 1  # much came in while we copied: copy it right away
                done = -1
            else:  # little is left to copy: the broker does it between two of its writes
                hurries = 0
                self.request = "catch-up"


class SqliteStorage:
    """The Storage interface on one SQLite file (see zchat.storage.base)."""

    def __init__(self, path: str | Path, search: bool = True) -> None:
        self.path = Path(path)
        self.search_wanted = search  # False: no index file, no thread (searches not_supported)
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._sync_fd: int | None = None
        self.epoch = ""
        self.searchable = False  # FTS5 is there (the sqlite3 build may lack it)
        self._search: SearchIndex | None = None  # the index file and its thread (zchat.storage.sqlite_search)
        self._trimmed = 0  # search_redo rows up to this n deleted (the index thread applied them)
        self._commit_bytes = CHECKPOINT_PAGES * 4120  # a commit's WAL frames besides its text (open() reads page_size)

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
            wal = mode == "wal"
            if not wal:
                log.warning("SQLite %s: journal_mode is %s, not wal", self.path, mode)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            if wal:
                conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpoint thread does them
                # When the WAL starts over, give back what an unusual burst made it grow
                # to (not every time: truncating a file takes milliseconds).
                conn.execute(f"PRAGMA journal_size_limit={4 * WAL_LIMIT_BYTES}")
            conn.execute("PRAGMA synchronous=FULL")  # the marker (and a new epoch) survive power loss
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            have = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
            for column in ("ref", "edited"):  # a file from before edits
                if column not in have:
                    conn.execute(f"ALTER TABLE messages ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
            self._open_search(conn)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', ?) ON CONFLICT(key) DO NOTHING",
                (secrets.token_hex(8),),
            )
            this_boot = boot_id()
            running = conn.execute("SELECT value FROM meta WHERE key = 'running'").fetchone()
            if running is not None and running[0] != this_boot:
                old = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
                conn.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (secrets.token_hex(8),))
                log.warning(
                    "SQLite %s was open when the machine went down (boot %s, now %s): its last commits may "
                    "have been rolled back, so history epoch %s ends here and a new one starts",
                    self.path, running[0] or "?", this_boot or "?", old,
                )
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('running', ?)", (this_boot,))
            self.epoch = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
            conn.execute("COMMIT")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._commit_bytes = CHECKPOINT_PAGES * (conn.execute("PRAGMA page_size").fetchone()[0] + 24)
        except sqlite3.Error as exc:
            conn.close()
            raise StorageError(f"cannot open SQLite history {self.path}: {exc}") from exc
        self._conn = conn
        if wal:
            # An fd of our own on the file, for the checkpoint thread's fsyncs. Closing any
            # fd of a file drops every POSIX lock this process holds on it, SQLite's
            # included, so close() closes it only after the connections are closed.
            try:
                self._sync_fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                log.warning("SQLite %s: no fd for background fsyncs: %s", self.path, exc)
            self._checkpointer = _Checkpointer(self.path, self._sync_fd)
            self._checkpointer.start()
        self._start_search()
        log.info("opened SQLite history %s (epoch %s)", self.path, self.epoch)
        return self.epoch

    def _open_search(self, conn: sqlite3.Connection) -> None:
        """The history's side of search: the redo table; and the index tables an earlier
        version kept in this file, dropped (the index now has a file of its own)."""
        conn.execute(REDO_SCHEMA)
        try:
            conn.execute("SAVEPOINT search")
            conn.execute("DROP TABLE IF EXISTS search_text")
            conn.execute("DROP TABLE IF EXISTS search_rows")
            conn.execute("DELETE FROM meta WHERE key = 'search'")
            conn.execute("RELEASE search")
        except sqlite3.OperationalError as exc:  # no FTS5 here to drop it with
            conn.execute("ROLLBACK TO search")
            conn.execute("RELEASE search")
            log.warning("SQLite %s: the old search tables stay (%s)", self.path, exc)

    def _start_search(self) -> None:
        """Open (or rebuild) the index file and start its thread; without FTS5 (or a
        writable index file) the broker still runs, and answers searches ``not_supported``."""
        if not self.search_wanted:
            return
        index = SearchIndex(self.path, self.epoch)
        db = self._db
        # Lines changed (edited, deleted, pruned) by a run without an index: the index
        # file may still hold their old words, so it is made again.
        stale = db.execute("SELECT 1 FROM meta WHERE key = 'search_stale'").fetchone() is not None
        try:
            self.searchable = index.open(dict(db.execute(_HEADS_SQL)), stale=stale)
        except sqlite3.Error as exc:
            log.error("SQLite %s: no search index (%s): searches are answered not_supported", self.path, exc)
            self.searchable = False
        if self.searchable and stale:  # the new file holds nothing stale
            db.execute("DELETE FROM meta WHERE key = 'search_stale'")
        self._search = index if self.searchable else None

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
        """Stop the search index and checkpoint threads, fold the WAL into the file, close
        (what the index had not reached, the next open's index finds past its cursors)."""
        search, self._search = self._search, None
        if search is not None:
            search.close()
        conn, self._conn = self._conn, None
        checkpointer, self._checkpointer = self._checkpointer, None
        sync_fd, self._sync_fd = self._sync_fd, None
        if conn is None:
            return
        try:
            if checkpointer is not None and not checkpointer.stop(CHECKPOINTER_JOIN_TIMEOUT):
                log.warning("SQLite %s: checkpoint thread still busy after %.0fs; closing anyway",
                            self.path, CHECKPOINTER_JOIN_TIMEOUT)
                sync_fd = None  # still in use, and so is the thread's connection: leave it open
            conn.execute("DELETE FROM meta WHERE key = 'running'")  # a clean close
            # TRUNCATE waits (busy_timeout) for other processes' readers to leave the WAL.
            conn.execute("PRAGMA busy_timeout=1000")
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                log.warning("SQLite %s: final checkpoint incomplete; the WAL file stays", self.path)
        except sqlite3.Error as exc:
            log.warning("SQLite %s: final checkpoint failed (the WAL file stays): %s", self.path, exc)
        finally:
            conn.close()
            if sync_fd is not None:
                os.close(sync_fd)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError("SQLite storage is not open")
        return self._conn

    def _wrote(self, count: int, size: int = 0) -> None:
        """Tell the checkpoint thread about a committed write of ``count`` rows and about
        ``size`` bytes of text (plus CHECKPOINT_PAGES pages); serve what it asked for."""
        checkpointer = self._checkpointer
        if checkpointer is None:
            return
        checkpointer.written += count
        checkpointer.pending = pending = checkpointer.pending + size + self._commit_bytes
        if checkpointer.idle or pending >= CHECKPOINT_BYTES:
            checkpointer.wake.set()
        if checkpointer.request is not None:
            self._serve(checkpointer)

    def _serve(self, checkpointer: _Checkpointer) -> None:
        """Do what the checkpoint thread asked of the broker's thread (rare)."""
        request = checkpointer.request
        db = self._db
        try:
            if request == "autocheckpoint":  # the thread has given up and ended
                db.execute("PRAGMA wal_autocheckpoint=1000")  # SQLite's default
                self._checkpointer = None
            else:
                # Right after our own commit nothing else writes, so this copies what the
                # thread had not yet (little) and the next write starts the WAL over.
                busy, _, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if busy:
                    return  # a checkpoint is running elsewhere: try after the next write
                checkpointer.catch_ups += 1
        except sqlite3.Error as exc:
            log.warning("SQLite %s: checkpoint (%s) failed: %s", self.path, request, exc)
        if checkpointer.request == request:
            checkpointer.request = None
        checkpointer.wake.set()

    # -------------------------------------------------------------- history

    async def append(self, messages: Sequence[Msg], members: Sequence[MemberChange] = ()) -> None:
        """Insert all messages and membership changes in one transaction; a duplicate
        (room, seq) inserts none."""
        if not messages and not members:
            return
        rows = [(m.room, m.seq, m.id, m.ts, m.sender, m.kind, m.text, m.to, m.cid, m.ref, m.edited) for m in messages]
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(_INSERT_SQL, rows)
            for room, name, member in members:
                db.execute(_JOIN_SQL if member else _LEAVE_SQL, (room, name))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(db)
            if isinstance(exc, sqlite3.IntegrityError):
                raise StorageError(f"refused {len(rows)} messages: (room, seq) already stored: {exc}") from exc
            # Disk full, read-only file, I/O error, locked: the store, not the batch.
            raise StorageUnavailable(f"SQLite append failed: {exc}") from exc
        search = self._search
        if search is not None:
            rooms = {m.room for m in messages if m.kind in TOMBSTONED_KINDS}
            if rooms:
                search.stored(rooms)  # its thread indexes them (zchat.storage.sqlite_search)
        self._wrote(len(rows) + len(members), sum(len(m.text) for m in messages))

    def _redo(self, db: sqlite3.Connection, room: str, lo: int, hi: int) -> None:
        """In a change's transaction: tell the index thread to read room's lo..hi again
        (and forget the changes it applied)."""
        search = self._search
        if search is None:  # no thread to tell: the next one with search rebuilds its index
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('search_stale', '1')")
            return
        db.execute(REDO_SQL, (room, lo, hi))
        done = search.redo_done
        if done > self._trimmed:
            db.execute(TRIM_SQL, (done,))
            self._trimmed = done

    def search_index(self) -> tuple[int, int] | None:
        """(commits not yet indexed, bytes of the index file), or None without search (metrics)."""
        search = self._search
        return None if search is None else (search.behind, search.size())

    def _changed(self) -> None:
        if self._search is not None:
            self._search.changed()

    def _rollback(self, db: sqlite3.Connection) -> None:
        """End a failed transaction (SQLite may have rolled it back itself, e.g. on SQLITE_FULL)."""
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("SQLite %s: rollback failed: %s", self.path, exc)

    async def prune(self, room: str, keep: int = 0, before_ts: float = 0.0, batch: int = 500) -> int:
        """Delete a batch of room's oldest messages past retention (see Storage.prune).

        Runs on the broker's connection between its turns: one short write transaction
        (a primary-key range delete of at most ``batch`` rows, about a millisecond for
        500) rather than a second writer, which would make the broker's commits wait on
        the write lock. Seqs are contiguous within a room, so "beyond the newest keep"
        is ``seq <= head - keep``; ts grows with seq, so the old ones are a prefix.
        """
        if batch <= 0 or (keep <= 0 and before_ts <= 0):
            return 0
        db = self._db
        rows = db.execute(
            "SELECT seq, ts FROM messages WHERE room = ? ORDER BY seq LIMIT ?", (room, batch)
        ).fetchall()
        if not rows:
            return 0
        head = db.execute("SELECT MAX(seq) FROM messages WHERE room = ?", (room,)).fetchone()[0]
        cut = 0
        if keep > 0:
            cut = head - keep
        if before_ts > 0:
            for seq, ts in rows:
                if ts >= before_ts:
                    break
                cut = max(cut, seq)
        cut = min(cut, rows[-1][0], head - 1)  # a batch at most; never the newest
        if cut < rows[0][0]:
            return 0
        try:
            db.execute("BEGIN IMMEDIATE")
            deleted = db.execute("DELETE FROM messages WHERE room = ? AND seq <= ?", (room, cut)).rowcount
            self._redo(db, room, rows[0][0], cut)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(db)
            raise StorageUnavailable(f"SQLite prune of {room!r} failed: {exc}") from exc
        self._changed()
        self._wrote(deleted)
        return deleted

    async def heads(self) -> dict[str, int]:
        return dict(self._db.execute(_HEADS_SQL))

    async def range(self, room: str, after: int, limit: int, before: int = 0, max_bytes: int = 0) -> Page:
        upper = before if before > 0 else _MAX_SEQ
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq > ? AND seq < ? ORDER BY seq LIMIT ?",
            (room, after, upper, max(0, limit)),
        )
        return _page(rows, max_bytes)

    async def last(self, room: str, limit: int, before: int = 0, max_bytes: int = 0) -> Page:
        upper = before if before > 0 else _MAX_SEQ
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (room, upper, max(0, limit)),
        )
        page = _page(rows, max_bytes)
        page.reverse()
        return page

    async def first_seq(self, room: str) -> int:
        row = self._db.execute("SELECT MIN(seq) FROM messages WHERE room = ?", (room,)).fetchone()
        return row[0] or 0

    async def recent(self, limit: int) -> list[Msg]:
        """Newest ``limit`` messages with a cid over all rooms, oldest first.

        There is no index on ts (it cost every insert): this merges the rooms, each read
        newest first along the primary key a few rows at a time, and opens a room only
        once its newest message could still make the cut. It relies on ts growing with
        seq inside a room, which the broker's clock gives. Ties in ts go to the greater
        room, then the greater seq: the order the old index on ts gave.
        """
        if limit <= 0:
            return []
        db = self._db
        heads = [head for head in db.execute(_NEWEST_SQL) if head[0] is not None]  # (ts, room)
        if not heads:
            return []
        heads.sort(reverse=True)  # the room with the newest message first
        # The heap holds one entry per open room: (-ts, rank, -seq, room number) of its
        # next row; rank orders rooms by name, descending, so the smallest entry is next.
        rank = {room: i for i, room in enumerate(sorted((room for _, room in heads), reverse=True))}
        first = min(limit, limit // len(heads) + 4)  # rows to read from a room at first
        cursors: list[list[Any]] = []  # per open room: [rows, position, rows asked for, room]
        heap: list[tuple[float, int, int, int]] = []
        out: list[_Row] = []
        opened = 0
        while len(out) < limit:
            # Open every room whose newest message beats the best row on the heap.
            while opened < len(heads) and (
                not heap or (-heads[opened][0], rank[heads[opened][1]]) < heap[0][:2]
            ):
                room = heads[opened][1]
                opened += 1
                rows = db.execute(_ROOM_RECENT_SQL, (room, _MAX_SEQ, first)).fetchall()
                if rows:
                    row = rows[0]
                    heapq.heappush(heap, (-row[3], rank[room], -row[1], len(cursors)))
                    cursors.append([rows, 0, first, room])
            if not heap:
                break
            number = heap[0][3]
            cursor = cursors[number]
            rows, position, want, room = cursor
            out.append(rows[position])
            position += 1
            if position == len(rows) and len(rows) == want:  # read on
                want = min(4 * want, limit)
                rows = db.execute(_ROOM_RECENT_SQL, (room, rows[-1][1], want)).fetchall()
                cursor[0], cursor[2], position = rows, want, 0
            cursor[1] = position
            if position < len(rows):
                row = rows[position]
                heapq.heapreplace(heap, (-row[3], rank[room], -row[1], number))
            else:
                heapq.heappop(heap)
        out.reverse()
        return [_row_to_msg(row) for row in out]

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
        self._wrote(1)
        return cur.rowcount == 1

    async def members(self) -> dict[str, set[str]]:
        result: dict[str, set[str]] = {}
        for room, name in self._db.execute("SELECT room, name FROM members"):
            result.setdefault(room, set()).add(name)
        return result

    async def set_member(self, room: str, name: str, member: bool) -> None:
        self._db.execute(_JOIN_SQL if member else _LEAVE_SQL, (room, name))
        self._wrote(1)

    # ---------------------------------------------------- room settings

    async def change_rooms(self, changes: Sequence[RoomChange]) -> None:
        if not changes:
            return
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for room, role, value, on in changes:
                if on:
                    db.execute("INSERT INTO room_roles (room, role, value) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (room, role, value))
                else:
                    db.execute("DELETE FROM room_roles WHERE room = ? AND role = ? AND value = ?", (room, role, value))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(db)
            raise StorageUnavailable(f"SQLite room settings failed: {exc}") from exc
        self._wrote(len(changes))

    async def rooms_state(self) -> dict[str, dict[str, set[str]]]:
        state: dict[str, dict[str, set[str]]] = {}
        for room, role, value in self._db.execute("SELECT room, role, value FROM room_roles"):
            state.setdefault(room, {}).setdefault(role, set()).add(value)
        return state

    async def tombstone(self, room: str, seq: int) -> bool:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                f"UPDATE messages SET kind = 'deleted', text = '' WHERE room = ? AND seq = ? AND kind IN {TOMBSTONED_KINDS!r}",
                (room, seq),
            )
            if cur.rowcount:
                self._redo(db, room, seq, seq)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(db)
            raise StorageUnavailable(f"SQLite tombstone failed: {exc}") from exc
        if cur.rowcount:
            self._changed()
        self._wrote(1)
        return cur.rowcount == 1

    async def edit(self, room: str, seq: int, text: str, by: int) -> bool:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                f"UPDATE messages SET text = ?, edited = ? WHERE room = ? AND seq = ? AND kind IN {TOMBSTONED_KINDS!r} AND edited < ?",
                (text, by, room, seq, by),
            )
            if cur.rowcount:
                self._redo(db, room, seq, seq)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(db)
            raise StorageUnavailable(f"SQLite edit failed: {exc}") from exc
        if cur.rowcount:
            self._changed()
        self._wrote(1)
        return cur.rowcount == 1

    async def search(
        self, text: str, limit: int, before: int = 0, room: str = "", readable: Callable[[str], bool] | None = None,
        max_bytes: int = 0,
    ) -> Found:
        """Newest first along the index's positions (the order lines were stored), one
        row at a time, skipping rooms ``readable`` refuses (see Storage.search); once the
        index thread has every line stored before the call."""
        search = self._search
        if search is None:
            raise SearchUnsupported("this broker's SQLite has no full-text search (FTS5)")
        found = Found()
        query = fts_query(text)
        if not query or limit <= 0:
            return found
        await search.caught_up()
        rows = None
        reader = search.reader()
        try:
            rows = search_rows(reader, query, before if before > 0 else _MAX_SEQ, room)
            size = scanned = 0
            for row in rows:
                scanned += 1
                if readable is None or readable(row[1]):
                    size += len(row[7].encode()) + 128  # storage.base.msg_bytes, on the row
                    if max_bytes and size > max_bytes and found:
                        found.next = row[0] + 1  # this one starts the next page
                        break
                    found.append(_row_to_msg(row[1:]))
                    if len(found) >= limit:
                        found.next = row[0]
                        break
                if scanned >= MAX_SEARCH_SCAN:
                    found.next = row[0]
                    break
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite search failed: {exc}") from exc
        finally:
            if rows is not None:
                rows.close()
            reader.close()
        return found

    async def release_user(self, name: str, digest: bytes | None = None) -> bool:
        if digest is None:
            cur = self._db.execute("DELETE FROM users WHERE name = ?", (name,))
        else:
            cur = self._db.execute("DELETE FROM users WHERE name = ? AND digest = ?", (name, digest))
        self._wrote(1)
        return cur.rowcount == 1

    # ------------------------------------------------- invites and revocations

    def _transaction(self, work: Any) -> Any:
        """Run ``work(db)`` in one IMMEDIATE transaction; StorageUnavailable if it fails."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            result = work(db)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(db)
            raise StorageUnavailable(f"SQLite write failed: {exc}") from exc
        self._wrote(1)
        return result

    async def add_invite(self, code: str, expires: float, now: float, limit: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM invites WHERE expires <= ?", (now,))
            if db.execute("SELECT COUNT(*) FROM invites").fetchone()[0] >= limit:
                return False
            cur = db.execute("INSERT INTO invites (code, expires) VALUES (?, ?) ON CONFLICT DO NOTHING", (code, expires))
            return cur.rowcount == 1

        return bool(self._transaction(work))

    async def use_invite(self, code: str, now: float) -> float:
        def work(db: sqlite3.Connection) -> float:
            rows = db.execute("DELETE FROM invites WHERE code = ? AND expires > ? RETURNING expires", (code, now)).fetchall()
            return float(rows[0][0]) if rows else 0.0

        return float(self._transaction(work))

    async def invites(self, now: float) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM invites WHERE expires > ?", (now,)).fetchone()[0])

    async def set_revoked(self, key: bytes, revoked: bool, now: float, limit: int) -> None:
        def work(db: sqlite3.Connection) -> None:
            if not revoked:
                db.execute("DELETE FROM revoked WHERE key = ?", (key,))
                return
            db.execute("INSERT OR REPLACE INTO revoked (key, ts) VALUES (?, ?)", (key, now))
            db.execute("DELETE FROM revoked WHERE key IN (SELECT key FROM revoked ORDER BY ts DESC LIMIT -1 OFFSET ?)", (limit,))

        self._transaction(work)

    async def revoked_keys(self) -> set[bytes]:
        return {bytes(key) for (key,) in self._db.execute("SELECT key FROM revoked")}
