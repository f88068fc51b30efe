"""Where ``zchat talk`` left off: its read positions, per user and broker, in the data
directory, so a restarted talk shows what was said since (``Client(cursors=...)``
delivers it, up to its ``recover_limit``, and reports the rest as a Gap it can show).

One small JSON file a (user, broker): ``DATA_DIR/cursors/NAME@BROKERHASH.json``, mode
0600, written atomically (temporary file, fsync, rename) so a crash leaves the old
positions or the new ones, never half. A damaged file is set aside and talk starts
fresh: losing positions costs a replay, never the chat.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

from zchat import protocol as p

log = logging.getLogger(__name__)

FORMAT = 1
#: Rooms and conversations one file keeps (the highest seqs win past it): a bound on the
#: file and on what a restart asks the broker for.
MAX_ROOMS = 2000

Cursors = dict[str, tuple[str, int]]


def broker_id(address: str) -> str:
    """The broker part of the file name: its endpoint without the key part."""
    endpoint = address.split("#", 1)[0]
    return hashlib.sha256(endpoint.encode()).hexdigest()[:16]


class CursorFile:
    """The read positions of ``name`` at ``broker`` under ``directory``."""

    def __init__(self, directory: Path, name: str, broker: str) -> None:
        if not p.valid_name(name):
            raise ValueError(f"bad name {name!r}")
        self.path = Path(directory) / "cursors" / f"{name}@{broker_id(broker)}.json"

    def load(self) -> Cursors:
        """room -> (epoch, last seq shown); {} when there is no file or it is damaged."""
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT or not isinstance(data.get("rooms"), dict):
                raise ValueError("unknown format")
            out: Cursors = {}
            for room, value in data["rooms"].items():
                if isinstance(value, list) and len(value) == 2:  # an odd entry is skipped, the rest kept
                    epoch, seq = value
                    if isinstance(epoch, str) and type(seq) is int and seq >= 0:
                        out[room] = (epoch, seq)
            return out
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, KeyError, OSError) as exc:
            aside = self.path.with_name(self.path.name + ".damaged")
            log.warning("read positions in %s are unreadable (%s): starting afresh, the file is kept as %s", self.path, exc, aside.name)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            return {}

    def save(self, cursors: Mapping[str, tuple[str, int]]) -> None:
        """Write ``cursors`` (``Client.cursors()``), at most MAX_ROOMS of them."""
        rooms = dict(sorted(cursors.items(), key=lambda kv: kv[1][1], reverse=True)[:MAX_ROOMS])
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"format": FORMAT, "rooms": {room: [e, s] for room, (e, s) in sorted(rooms.items())}}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def new_since(seqs: Iterable[int], cursor: int) -> int | None:
    """The index of the first line after ``cursor`` among ``seqs`` (ascending): where
    the "new since you left" marker goes; None when nothing is new."""
    for i, seq in enumerate(seqs):
        if seq > cursor:
            return i
    return None
