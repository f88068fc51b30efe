"""Storage backends behind one interface; ``open_storage`` picks one from a settings string."""

from __future__ import annotations

from pathlib import Path

from zchat.storage.base import (
    Found,
    MemberChange,
    Page,
    RoomChange,
    SearchUnsupported,
    Storage,
    StorageError,
    StorageUnavailable,
    msg_bytes,
)

__all__ = [
    "Found", "MemberChange", "Page", "RoomChange", "SearchUnsupported", "Storage", "StorageError", "StorageUnavailable",
    "msg_bytes", "open_storage",
]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_storage(spec: str, db_path: Path) -> Storage:
    """Build (not open) the backend ``spec`` names: "sqlite" (at db_path) or a Redis URL."""
    if spec == "sqlite":
        from zchat.storage.sqlite import SqliteStorage

        return SqliteStorage(db_path)
    if spec.startswith(_REDIS_SCHEMES):
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        from zchat.storage.redis import RedisStorage

        # ?prefix=P: the key prefix (brokers of one set share it; sets on one Redis differ);
        # ?cluster=1: the URL names a node of a Redis Cluster.
        parts = urlsplit(spec)
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {k: v for k, v in query if k in ("prefix", "cluster")}
        if not ours:
            return RedisStorage(spec)
        rest = urlencode([(k, v) for k, v in query if k not in ours])
        return RedisStorage(
            urlunsplit(parts._replace(query=rest)), prefix=ours.get("prefix", "zchat:"), cluster=ours.get("cluster") in ("1", "yes", "true"),
        )
    raise ValueError(
        f"unknown storage {spec!r}: use 'sqlite' or a Redis URL (redis://, rediss:// or unix://)"
    )
