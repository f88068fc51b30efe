"""Storage backends behind one interface; ``open_storage`` picks one from a settings string."""

from __future__ import annotations

from pathlib import Path

from zchat.storage.base import MemberChange, Page, RoomChange, Storage, StorageError, StorageUnavailable, msg_bytes

__all__ = [
    "MemberChange", "Page", "RoomChange", "Storage", "StorageError", "StorageUnavailable", "msg_bytes", "open_storage",
]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_storage(spec: str, db_path: Path) -> Storage:
    """Build (not open) the backend ``spec`` names: "sqlite" (at db_path) or a Redis URL."""
    if spec == "sqlite":
        from zchat.storage.sqlite import SqliteStorage

        return SqliteStorage(db_path)
    if spec.startswith(_REDIS_SCHEMES):
        from zchat.storage.redis import RedisStorage

        return RedisStorage(spec)
    raise ValueError(
        f"unknown storage {spec!r}: use 'sqlite' or a Redis URL (redis://, rediss:// or unix://)"
    )
