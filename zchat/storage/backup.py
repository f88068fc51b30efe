"""A consistent copy of a running broker's SQLite history, from another process.

SQLite's online backup API copies the file ``pages`` pages a step with a pause between
steps, so the disk and the CPU (shared with the broker) are never taken for long, and
the broker is never blocked: the copy only reads, and in WAL mode a reader neither waits
for the writer nor makes it wait. The backup holds one read transaction from the first
step to the last, so every step reads the same snapshot: without it, each write of the
running broker would make the next step start the copy over (SQLite restarts a backup
whose source another connection changed), and a busy broker would never let it finish.
While the snapshot is held the WAL cannot start over, so it grows by whatever the
broker writes during the copy (the checkpoint thread trims it afterwards).

The copy is a self-contained file (rollback journal, no -wal beside it), checked with
``PRAGMA quick_check``, written under a temporary name, fsynced, then renamed into
place. It gets a new history epoch: a broker restored from it has lost whatever came
after the copy, so clients that saw later messages must start afresh (they are told
"the broker's history was reset") rather than take new messages for ones they have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import sqlite3
import time
from pathlib import Path

from zchat.storage.base import StorageError

log = logging.getLogger(__name__)

_SQLITE_HEADER = b"SQLite format 3\x00"

#: Pages copied a step (4 KiB each: 1 MiB a step) and seconds of pause between steps.
STEP_PAGES = 256
STEP_PAUSE = 0.005


@dataclasses.dataclass
class BackupResult:
    path: Path
    bytes: int
    messages: int
    epoch: str  # the copy's (new) epoch
    source_epoch: str
    seconds: float
    steps: int
    longest_step: float  # seconds, the longest single step (the source's read, the copy's write)


def backup_sqlite(source: Path, dest: Path, pages: int = STEP_PAGES, pause: float = STEP_PAUSE, force: bool = False) -> BackupResult:
    """Copy ``source`` (in use by a broker or not) to ``dest``; raise StorageError if it cannot."""
    source, dest = Path(source), Path(dest)
    try:
        with source.open("rb") as fh:
            header = fh.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise StorageError(f"cannot read history {source}: {exc.strerror or exc}") from None
    if header != _SQLITE_HEADER:
        raise StorageError(f"{source} is not an SQLite database")
    if dest.exists() and not force:
        raise StorageError(f"{dest} exists; remove it or give --force")
    if dest.resolve() == source.resolve():
        raise StorageError("the backup must not be the history file itself")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    started = time.perf_counter()
    steps = 0
    longest = 0.0
    try:
        with contextlib.closing(sqlite3.connect(str(source), isolation_level=None)) as src:
            src.execute("PRAGMA busy_timeout=5000")
            src.execute("PRAGMA query_only=1")  # this connection never writes the live file
            with contextlib.closing(sqlite3.connect(str(tmp), isolation_level=None)) as dst:
                src.execute("BEGIN")  # one snapshot for the whole copy
                source_epoch = _epoch(src)
                last = time.perf_counter()

                def progress(_status: int, _remaining: int, _total: int) -> None:
                    nonlocal steps, longest, last
                    now = time.perf_counter()
                    steps += 1
                    longest = max(longest, now - last)
                    last = now + pause  # the pause comes after this callback

                src.backup(dst, pages=max(1, pages), progress=progress, sleep=pause)
                src.execute("COMMIT")
                # A restored backup lacks what came later: a new epoch tells clients so.
                epoch = secrets.token_hex(8)
                dst.execute("PRAGMA journal_mode=DELETE")
                dst.execute("BEGIN IMMEDIATE")
                dst.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (epoch,))
                dst.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('backup_of', ?)", (source_epoch,))
                dst.execute("DELETE FROM meta WHERE key = 'running'")  # the copy was never open
                dst.execute("COMMIT")
                check = dst.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise StorageError(f"the copy failed its integrity check: {check}")
                messages = dst.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except sqlite3.Error as exc:
        raise StorageError(f"backup of {source} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    result = BackupResult(
        path=dest, bytes=dest.stat().st_size, messages=messages, epoch=epoch, source_epoch=source_epoch,
        seconds=time.perf_counter() - started, steps=steps, longest_step=longest,
    )
    log.info("backed up %s to %s: %d messages, %d bytes in %.2fs", source, dest, messages, result.bytes, result.seconds)
    return result


def _epoch(conn: sqlite3.Connection) -> str:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
    except sqlite3.Error as exc:
        raise StorageError(f"not a zchat history: {exc}") from exc
    if row is None:
        raise StorageError("not a zchat history: no epoch")
    return str(row[0])


def _fsync_dir(path: Path) -> None:
    """Make the rename durable (where directories can be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
