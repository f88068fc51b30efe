"""Full-text search for SqliteStorage, kept off the broker's thread.

The words of stored lines (FTS5) live in a file of their own beside the history
(``history.db-search``), written by a thread of their own. A flat-out ingest spent about
a third of the broker's thread in the index (FTS5 ~2.5 us a line, its row numbering
~1.2 us); here the broker's append stores the line only, and the thread indexes what
the history holds past its cursors, in SQLite's C code with the GIL released, on the
other core. Its own file, because a second writer on the history file would take the
one write lock the broker's appends need (and SQLite's busy handler sleeps for ms).

What the index file holds (all written by the thread, in one transaction a pass):
- ``cursors``: per room, the highest seq looked at (seqs are contiguous within a room,
  so "past the cursor" is every line not yet indexed, whoever stored it);
- ``search_map``: a search position (``id``, the FTS rowid and the wire's ``next``) per
  text and /me line, in the order stored (by ts across the rooms of a pass); never
  reused (``meta`` 'next_id');
- ``search_text``: the words; ``meta``: the history's epoch and the redo cursor.

Changes to lines already indexed (edits, tombstones, retention) are written by the
broker, in the change's own transaction, to ``search_redo`` in the history file: the
thread applies each by reading the lines as they are then (deleted words leave the
index file too). A search first waits until the thread has indexed every commit made
before it (WAIT_FOR_INDEX at most), then reads both files through a connection of its
own that never writes. The index is rebuilt from the history whenever it cannot be
trusted: a new epoch (the history rolled back after a crash), a cursor past its room's
head (an older copy of the history restored), or a missing or unreadable file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from zchat.storage.base import TOMBSTONED_KINDS, StorageUnavailable

log = logging.getLogger(__name__)

#: Seconds the thread lets new lines gather before a pass (each FTS5 commit writes a
#: segment: a line a pass made the index five times dearer than the line itself)...
PASS_DELAY = 0.25
#: ...and the most lines a pass looks at (a rebuild goes in such steps).
PASS_LINES = 20_000
#: Changes (edits, tombstones, prunes) a pass applies at most.
REDO_BATCH = 500
#: Seconds a search waits for the thread to index what was stored before it.
WAIT_FOR_INDEX = 5.0
#: Seconds the thread waits after a failed pass (disk full...) before trying again.
RETRY_AFTER = 1.0
#: Seconds close() waits for a pass in progress.
JOIN_TIMEOUT = 5.0
#: The index thread's nice value: on a busy machine, storing and delivering lines come
#: first and indexing catches up after (a search waits for it, WAIT_FOR_INDEX at most).
#: Measured: a flat-out publisher's ingest 7-10% faster on 2 cores, the quiet path's
#: latency unchanged (docs/performance.md, issue 15 session 9).
INDEX_NICE = 10

_KINDS = repr(TOMBSTONED_KINDS)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS cursors (room TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS search_map (id INTEGER PRIMARY KEY, room TEXT NOT NULL, seq INTEGER NOT NULL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS search_map_line ON search_map (room, seq)",
    "CREATE VIRTUAL TABLE IF NOT EXISTS search_text USING fts5(text, tokenize = 'unicode61 remove_diacritics 2')",
)
#: The history file's side: the changes to apply, numbered (AUTOINCREMENT: a number is
#: never reused after the broker trims what the thread applied).
REDO_SCHEMA = "CREATE TABLE IF NOT EXISTS search_redo (n INTEGER PRIMARY KEY AUTOINCREMENT, room TEXT NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL)"
REDO_SQL = "INSERT INTO search_redo (room, lo, hi) VALUES (?, ?, ?)"
TRIM_SQL = "DELETE FROM search_redo WHERE n <= ?"

_STAGE_SQL = (
    "INSERT INTO temp.{table} (ts, room, seq, text) SELECT ts, room, seq, text FROM hist.messages "
    f"WHERE room = ? AND seq > ? AND seq <= ? AND kind IN {_KINDS} ORDER BY seq"
)
_WORDS_SQL = (
    "INSERT INTO search_text (rowid, text) SELECT s.id, m.text FROM search_map s "
    "JOIN hist.messages m ON m.room = s.room AND m.seq = s.seq WHERE {where}"
)
SEARCH_SQL = f"""
SELECT s.id, m.room, m.seq, m.id, m.ts, m.sender, m.kind, m.text, m.to_name, m.cid, m.ref, m.edited
FROM search_text JOIN search_map s ON s.id = search_text.rowid JOIN hist.messages m ON m.room = s.room AND m.seq = s.seq
WHERE search_text MATCH ? AND search_text.rowid < ? AND m.kind IN {_KINDS} {{room}} ORDER BY search_text.rowid DESC
"""


def file_bytes(path: Path) -> int:
    """Bytes an SQLite file takes on disk with its WAL and shm (0 for what is missing)."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.stat(f"{path}{suffix}").st_size
        except OSError:
            continue
    return total


def index_path(history: Path) -> Path:
    return history.with_name(history.name + "-search")


def _attach(conn: sqlite3.Connection, history: Path) -> None:
    conn.execute("ATTACH DATABASE ? AS hist", (str(history),))


class SearchIndex:
    """The index file and its thread. ``stored``/``changed`` are called on the broker's
    thread after each commit; ``caught_up`` and ``reader`` by its searches."""

    def __init__(self, history: Path, epoch: str) -> None:
        self.history = history
        self.path = index_path(history)
        self.epoch = epoch
        self.commits = 0  # commits the broker told us of (its thread only writes it)
        self.done = 0  # every commit up to this one is indexed (the thread writes it)
        self.redo_done = 0  # search_redo applied up to this n (the thread writes it)
        self._lock = threading.Lock()
        self._touched: set[str] = set()  # rooms with lines past their cursor, maybe
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._wake = threading.Event()
        self._hurry = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.native_id = 0  # the thread's id for the OS, once it runs (its nice value is set there)

    # ------------------------------------------------------------ lifecycle (broker's thread)

    def open(self, heads: dict[str, int], stale: bool = False) -> bool:
        """Make or check the file and start the thread; False if this SQLite lacks FTS5.
        ``stale``: the history changed lines while no index was kept (made again)."""
        try:
            conn = self._connect()
        except sqlite3.OperationalError as exc:
            if "fts5" in str(exc).lower():
                log.warning("SQLite %s: no full-text search (%s): searches are answered not_supported", self.history, exc)
                return False
            raise
        try:
            why = "may hold the words of lines changed while search was off" if stale else self._distrust(conn, heads)
            if why:
                conn.close()
                log.info("SQLite %s: search index %s: indexing the history into %s", self.history, why, self.path.name)
                for suffix in ("", "-wal", "-shm"):
                    try:
                        os.unlink(f"{self.path}{suffix}")
                    except FileNotFoundError:
                        pass
                conn = self._connect()
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (self.epoch,))
                top = conn.execute("SELECT COALESCE(MAX(n), 0) FROM hist.search_redo").fetchone()[0]
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('redo', ?)", (str(top),))
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_id', '0')")
            self.redo_done = int(conn.execute("SELECT value FROM meta WHERE key = 'redo'").fetchone()[0])
        finally:
            conn.close()
        self._touched = set(heads)  # what was stored while no thread indexed: found by the cursors
        self.commits = 1
        self._thread = threading.Thread(target=self._run, name="zchat-search-index", daemon=True)
        self._thread.start()
        self._wake.set()
        self._hurry.set()
        return True

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            _attach(conn, self.history)
            for statement in _SCHEMA:
                conn.execute(statement)
            # The new lines of a pass, numbered 1.. in the order stored (k): their positions
            # are k past the file's next_id, so the words go in without a join (a join
            # on (room, seq) cost a third of the FTS5 insert). Several rooms are copied
            # to ``unsorted`` first, then into ``stage`` in ts order.
            for table in ("stage (k INTEGER PRIMARY KEY,", "unsorted ("):
                conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} ts REAL NOT NULL, room TEXT NOT NULL, seq INTEGER NOT NULL, text TEXT NOT NULL)")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _distrust(self, conn: sqlite3.Connection, heads: dict[str, int]) -> str:
        """Why the file cannot be trusted for this history ("" if it can)."""
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            if row is None:
                return "is new"
            if row[0] != self.epoch:
                return f"is of history epoch {row[0]}, not {self.epoch}"
            if len(conn.execute("SELECT value FROM meta WHERE key IN ('redo', 'next_id')").fetchall()) < 2:
                return "has no cursors"
            for room, seq in conn.execute("SELECT room, seq FROM cursors"):
                if seq > heads.get(room, 0):
                    return f"has {room!r} indexed to seq {seq}, past its head {heads.get(room, 0)} (an older history?)"
        except sqlite3.DatabaseError as exc:
            return f"is unreadable ({exc})"
        return ""

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            self._wake.set()
            self._hurry.set()
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("SQLite %s: search index thread still busy after %.0fs", self.history, JOIN_TIMEOUT)
        self._settle(everyone=True)

    # ------------------------------------------------------------ the broker's side

    def stored(self, rooms: set[str]) -> None:
        """An append committed lines to ``rooms`` (called right after the commit)."""
        with self._lock:
            self._touched |= rooms
        self.commits += 1
        if not self._wake.is_set():
            self._wake.set()

    @property
    def behind(self) -> int:
        """Commits with lines to index that the thread has not indexed yet (metrics)."""
        return max(0, self.commits - self.done)

    def size(self) -> int:
        """Bytes the index file takes on disk (with its WAL and shm)."""
        return file_bytes(self.path)

    def changed(self) -> None:
        """A change committed its search_redo row."""
        self.commits += 1
        self._wake.set()

    async def caught_up(self, timeout: float | None = None) -> None:
        """Return once every commit made so far is indexed; StorageUnavailable after
        ``timeout`` (WAIT_FOR_INDEX)."""
        timeout = WAIT_FOR_INDEX if timeout is None else timeout
        target = self.commits
        if self.done >= target:
            return
        if self._thread is None:
            raise StorageUnavailable("the search index is closed")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._waiters.append((target, loop, fut))
        self._wake.set()
        self._hurry.set()
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise StorageUnavailable(f"the search index is more than {timeout:.0f}s behind; try again") from None

    def reader(self) -> sqlite3.Connection:
        """A connection for one search, closed after it: it never writes, and a
        connection left open beside the thread's kept the history's WAL from starting
        over under back-to-back writes (measured: 102 MB in 2 s, against 2-6 MB)."""
        if self._thread is None:
            raise StorageUnavailable("the search index is closed")
        reader = sqlite3.connect(str(self.path), isolation_level=None)
        _attach(reader, self.history)
        reader.execute("PRAGMA query_only = 1")
        return reader

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        try:  # Linux: a thread's own nice value (only ever raised: no privilege needed)
            os.setpriority(os.PRIO_PROCESS, self.native_id, max(INDEX_NICE, os.getpriority(os.PRIO_PROCESS, self.native_id)))
        except (OSError, AttributeError) as exc:
            log.debug("search index thread keeps its priority: %s", exc)
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            log.error("SQLite %s: search index thread cannot open %s: %s; searches will fail", self.history, self.path, exc)
            return
        try:
            while not self._stopping:
                self._wake.wait()
                self._wake.clear()
                if self._hurry.wait(PASS_DELAY):  # let lines gather, unless a search waits
                    self._hurry.clear()
                while not self._stopping:
                    try:
                        more = self._pass(conn)
                    except sqlite3.Error as exc:
                        self._rollback(conn)
                        log.warning("SQLite %s: search indexing failed (%s); trying again in %.0fs", self.path, exc, RETRY_AFTER)
                        self._wake.set()
                        self._hurry.wait(RETRY_AFTER)
                        break
                    if not more:
                        break
        except Exception:
            log.exception("SQLite %s: search index thread failed; searches will time out", self.path)
        finally:
            conn.close()

    def _pass(self, conn: sqlite3.Connection) -> bool:
        """Index what is past the cursors of the rooms touched, and apply pending changes,
        in one transaction. True if more is left than a pass takes."""
        commits = self.commits  # read before the snapshot: every commit up to it is in it
        with self._lock:
            rooms, self._touched = self._touched, set()
        try:
            more = self._index(conn, rooms)
        except BaseException:
            with self._lock:
                self._touched |= rooms
            raise
        if not more:
            self.done = commits
            self._settle()
        return more

    def _index(self, conn: sqlite3.Connection, rooms: set[str]) -> bool:
        # The changes to apply first, then the new lines copied with their text, each in a
        # statement of its own: the history is read for a moment, not for the pass (a
        # reader there keeps its WAL from starting over). A change committed after its
        # read is applied by the next pass, which reads the line as it is by then.
        redo = int(conn.execute("SELECT value FROM meta WHERE key = 'redo'").fetchone()[0])
        changes = conn.execute(
            "SELECT n, room, lo, hi FROM hist.search_redo WHERE n > ? ORDER BY n LIMIT ?", (redo, REDO_BATCH)
        ).fetchall()
        cursors = {room: self._cursor(conn, room) for room in rooms}
        left: set[str] = set()
        moved: list[tuple[str, int]] = []
        conn.execute("DELETE FROM temp.stage")
        budget = PASS_LINES
        table = "stage" if len(rooms) == 1 else "unsorted"
        for room in rooms:
            if budget <= 0:  # the rest next pass: a pass (and its transaction) stays bounded
                left.add(room)
                continue
            cursor = cursors[room]
            head = conn.execute("SELECT MAX(seq) FROM hist.messages WHERE room = ?", (room,)).fetchone()[0] or 0
            if head <= cursor:
                continue
            top = min(head, cursor + budget)
            budget -= top - cursor
            conn.execute(_STAGE_SQL.format(table=table), (room, cursor, top))
            moved.append((room, top))
            if top < head:
                left.add(room)
        if table == "unsorted":
            conn.execute("INSERT INTO temp.stage (ts, room, seq, text) SELECT ts, room, seq, text FROM temp.unsorted ORDER BY ts, room, seq")
            conn.execute("DELETE FROM temp.unsorted")
        conn.execute("BEGIN")
        # The index file's write lock (not the history's: BEGIN IMMEDIATE would take every
        # attached file's); another storage on the file may have moved the cursors meanwhile.
        conn.execute("UPDATE meta SET value = value WHERE key = 'epoch'")
        if any(self._cursor(conn, room) != cursors[room] for room, _ in moved):
            conn.execute("ROLLBACK")
            with self._lock:
                self._touched |= rooms
            return True  # read again
        for _, room, lo, hi in changes:  # each line as it is now: edited, deleted or gone
            line = (room, lo, hi)
            conn.execute("DELETE FROM search_text WHERE rowid IN (SELECT id FROM search_map WHERE room = ? AND seq BETWEEN ? AND ?)", line)
            conn.execute(_WORDS_SQL.format(where=f"s.room = ? AND s.seq BETWEEN ? AND ? AND m.kind IN {_KINDS}"), line)
            conn.execute(
                "DELETE FROM search_map WHERE room = ? AND seq BETWEEN ? AND ? AND NOT EXISTS "
                "(SELECT 1 FROM hist.messages m WHERE m.room = search_map.room AND m.seq = search_map.seq)", line,
            )
        if changes:
            redo = changes[-1][0]
            conn.execute("UPDATE meta SET value = ? WHERE key = 'redo'", (str(redo),))
        if moved:
            base = int(conn.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchone()[0])
            count = conn.execute("SELECT COALESCE(MAX(k), 0) FROM temp.stage").fetchone()[0]
            conn.execute("INSERT OR REPLACE INTO search_map (id, room, seq) SELECT ? + k, room, seq FROM temp.stage", (base,))
            conn.execute("INSERT INTO search_text (rowid, text) SELECT ? + k, text FROM temp.stage", (base,))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'next_id'", (str(base + count),))
            conn.executemany("INSERT INTO cursors (room, seq) VALUES (?, ?) ON CONFLICT(room) DO UPDATE SET seq = excluded.seq", moved)
        conn.execute("COMMIT")
        conn.execute("DELETE FROM temp.stage")
        self.redo_done = redo
        if left:
            with self._lock:
                self._touched |= left
        return bool(left) or len(changes) == REDO_BATCH

    @staticmethod
    def _cursor(conn: sqlite3.Connection, room: str) -> int:
        row = conn.execute("SELECT seq FROM cursors WHERE room = ?", (room,)).fetchone()
        return row[0] if row else 0

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("search index rollback failed: %s", exc)

    def _settle(self, everyone: bool = False) -> None:
        """Wake the searches waiting for commits now indexed (all of them when closing:
        they then find the index closed)."""
        done = self.done
        with self._lock:
            ready = [w for w in self._waiters if everyone or w[0] <= done]
            self._waiters = [w for w in self._waiters if not (everyone or w[0] <= done)]
        for _, loop, fut in ready:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that loop is closed
                pass


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def search_rows(reader: sqlite3.Connection, query: str, before: int, room: str) -> Any:
    """The matching lines, newest first, as a cursor the caller reads and closes."""
    params: tuple[Any, ...] = (query, before) + ((room,) if room else ())
    return reader.execute(SEARCH_SQL.format(room="AND s.room = ?" if room else ""), params)
