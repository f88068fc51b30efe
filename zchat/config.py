"""One settings object for every command.

Precedence, highest first: command-line flags, ``ZCHAT_*`` environment variables,
the TOML file (``--config PATH`` or ``config.toml`` in the user's config directory),
then defaults. ``sources`` records where each value came from, for ``zchat config``.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import tomllib
from pathlib import Path
from typing import Any, Mapping

import platformdirs

APP = "zchat"
ENV_PREFIX = "ZCHAT_"


def config_dir() -> Path:
    return Path(os.environ.get("ZCHAT_CONFIG_DIR") or platformdirs.user_config_dir(APP))


def data_dir() -> Path:
    return Path(os.environ.get("ZCHAT_DATA_DIR") or platformdirs.user_data_dir(APP))


def default_config_path() -> Path:
    return config_dir() / "config.toml"


@dataclasses.dataclass
class Settings:
    broker: str = "tcp://127.0.0.1:5555"  # where clients connect (the ROUTER endpoint)
    bind: str = "tcp://127.0.0.1:5555"  # where the broker listens
    name: str = ""
    db: str = ""  # SQLite path; empty means data_dir()/history.db
    storage: str = "sqlite"  # "sqlite" or a redis:// URL
    log_level: str = "INFO"
    log_format: str = "text"
    heartbeat: float = 10.0  # seconds between client pings; presence timeout is 3x
    rate: float = 20.0  # messages per second per user (token bucket refill)
    burst: float = 100.0  # token bucket size
    max_bytes: int = 64 * 1024

    def db_path(self) -> Path:
        return Path(self.db) if self.db else data_dir() / "history.db"


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    kind = type(FIELDS[name].default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting {name!r}: expected {kind.__name__}, got {value!r}") from None


def load_settings(
    flags: Mapping[str, Any] | None = None,
    config_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Merge defaults < file < environment < flags; flags that are None are unset."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources = {name: "default" for name in FIELDS}
    path = Path(config_path) if config_path else default_config_path()
    if path.exists():
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        for key, value in data.items():
            key = key.replace("-", "_")
            if key in FIELDS:
                values[key], sources[key] = _coerce(key, value), f"file {path}"
    elif config_path:
        raise FileNotFoundError(f"config file {path} does not exist")
    for key in FIELDS:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None and raw != "":
            values[key], sources[key] = _coerce(key, raw), f"env {ENV_PREFIX}{key.upper()}"
    for key, value in (flags or {}).items():
        if value is not None and key in FIELDS:
            values[key], sources[key] = _coerce(key, value), "flag"
    return Settings(**values), sources


def secret_path(name: str) -> Path:
    return config_dir() / "secrets" / name


def load_secret(name: str) -> str:
    """The secret that proves this machine owns ``name``; made on first use, mode 0600."""
    path = secret_path(name)
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token
