"""One settings object for every command.

Precedence, highest first: command-line flags, ``ZCHAT_*`` environment variables,
the TOML file, then defaults. ``sources`` records where each value came from, for
``zchat config``.

The file is the one named by ``--config PATH``, else by ``ZCHAT_CONFIG``, else
``config.toml`` in the user's config directory (``ZCHAT_CONFIG_DIR`` overrides that
directory; see :func:`config_dir`). A file named explicitly must exist; the default
one is optional. Its keys are flat, top-level keys named like the settings below
(``log-level`` and ``log_level`` both work); tables and unknown keys are errors, so
a typo never passes silently::

    broker = "tcp://chat.example.org:5555"
    name = "carol"
    log-level = "DEBUG"
    rate = 20.0

Each setting ``x`` is also read from the environment variable ``ZCHAT_X`` (for
example ``ZCHAT_LOG_LEVEL``); an empty variable counts as unset. Every bad value,
wherever it came from, raises :class:`ConfigError` naming the setting, the source
and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import secrets
import tomllib
from pathlib import Path
from typing import Any, Mapping

import platformdirs

from zchat.protocol import MAX_MESSAGE_BYTES, MAX_REPLY_BYTES, valid_name

APP = "zchat"
ENV_PREFIX = "ZCHAT_"
#: Environment variable naming the config file (below ``--config``, above the default).
CONFIG_ENV = "ZCHAT_CONFIG"
#: Environment variables that place zchat's directories rather than set a setting.
DIR_ENVS = ("ZCHAT_CONFIG_DIR", "ZCHAT_DATA_DIR")

MIN_QUEUE_BUDGET = 2 * MAX_MESSAGE_BYTES  # one largest frame
MIN_SEND_BUDGET = MAX_REPLY_BYTES  # one largest reply
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
STORAGE_SCHEMES = ("redis://", "rediss://", "unix://")
_ENDPOINT_RE = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>[0-9]{1,5})\Z")


class ConfigError(ValueError):
    """A setting, the config file or an environment variable cannot be used."""


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where config.toml and the per-name secrets live (``ZCHAT_CONFIG_DIR`` overrides)."""
    env = os.environ if env is None else env
    return Path(env.get("ZCHAT_CONFIG_DIR") or platformdirs.user_config_dir(APP)).expanduser()


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the broker keeps its SQLite history by default (``ZCHAT_DATA_DIR`` overrides)."""
    env = os.environ if env is None else env
    return Path(env.get("ZCHAT_DATA_DIR") or platformdirs.user_data_dir(APP)).expanduser()


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    return config_dir(env) / "config.toml"


@dataclasses.dataclass
class Settings:
    broker: str = "tcp://127.0.0.1:5555"  # where clients connect (the ROUTER endpoint)
    bind: str = "tcp://127.0.0.1:5555"  # where the broker listens
    name: str = ""
    db: str = ""  # SQLite path; empty means data_dir()/history.db
    storage: str = "sqlite"  # "sqlite" or a redis:// URL
    log_level: str = "INFO"
    log_format: str = "text"
    heartbeat: float = 120.0  # seconds between client pings; presence timeout is 3x (a closed connection: at once)
    rate: float = 20.0  # messages per second per user (token bucket refill)
    burst: float = 100.0  # token bucket size
    max_bytes: int = MAX_MESSAGE_BYTES
    request_rate: float = 10.0  # requests per second per user (hello, join, history, who, ...)
    room_rate: float = 200.0  # stored lines per second per room, over all its senders
    max_rooms: int = 500  # rooms and DM conversations per user
    # The broker's edge (zchat.guard.GuardConfig has the memory arithmetic).
    max_per_address: int = 64  # TCP connections from one address on each broker port
    max_connections: int = 0  # connections on all ports; 0: the descriptor limit less a reserve
    claims_per_minute: int = 5  # new names one address may claim a minute; 0: no limit
    claim_timeout: float = 30.0  # seconds a new name's handshake has to say hello
    reserved_names: str = "admin,root,system,zchat"  # comma-separated; nobody may claim them
    queue_budget: int = 4 * 1024 * 1024  # bytes each connection's receive queue may hold
    send_budget: int = 16 * 1024 * 1024  # bytes each connection's send queue may hold
    handshake_timeout: float = 5.0  # seconds a TCP connection has to finish its handshake
    max_refusals: int = 1000  # refusals ignoring retry_after a user may draw in 10 s before it is cut; 0: no limit
    cooloff: float = 60.0  # seconds a user (or address) that was cut is refused
    registration: str = "open"  # who may claim a new name: open, invite or closed
    admins: str = ""  # comma-separated admin names or Z85 public keys
    # Retention (zchat.retention): 0 keeps everything, the default.
    retain_days: float = 0.0  # delete messages older than this many days
    retain_messages: int = 0  # keep at most this many (the newest) messages a room
    # zchat talk
    talk_remember: bool = True  # keep read positions in DATA_DIR/cursors; show what came while away
    talk_bell: bool = True  # ring the terminal bell on a mention or a DM
    talk_desktop: bool = True  # a desktop notification on a mention or a DM
    talk_notify: str = "auto"  # how: auto, osc777, osc9, notify-send or none

    def reserved(self) -> tuple[str, ...]:
        return tuple(n for n in (part.strip() for part in self.reserved_names.split(",")) if n)

    def admin_list(self) -> tuple[str, ...]:
        return tuple(a for a in (part.strip() for part in self.admins.split(",")) if a)

    def db_path(self) -> Path:
        return Path(self.db).expanduser() if self.db else data_dir() / "history.db"


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

#: One line per setting, shown by ``zchat config`` and the README.
HELP = {
    "broker": "endpoint clients connect to (the broker's ROUTER), tcp://HOST:PORT; several brokers of one set: comma-separated, tried in turn",
    "bind": "endpoint the broker binds; it also binds PORT+1 and PORT+2 (port 0: any free ports)",
    "name": "your chat name: lowercase letters, digits, _ and -",
    "db": "SQLite history file; empty means DATA_DIR/history.db",
    "storage": "'sqlite' or a redis:// URL",
    "log_level": "one of " + ", ".join(LOG_LEVELS),
    "log_format": "'text' or 'json' (one object a line)",
    "heartbeat": "seconds between client pings; presence times out after 3",
    "rate": "messages a second each user may send, on average (0: no limit)",
    "burst": "messages a user may send at once before the rate applies",
    "max_bytes": f"largest message body in bytes (at most {MAX_MESSAGE_BYTES})",
    "request_rate": "requests a second each user may make, on average (burst 100; 0 or rate 0: no limit)",
    "room_rate": "lines a second a room takes from all its senders together (burst 5 s of it; 0 or rate 0: no limit)",
    "max_rooms": "rooms and direct conversations each user may be in",
    "max_per_address": "TCP connections the broker takes from one address on each port (a client uses one a port)",
    "max_connections": "connections the broker takes in all; 0: its descriptor limit less a reserve",
    "claims_per_minute": "new names one address may claim a minute (0: no limit)",
    "claim_timeout": "seconds a new name's first connection has to say hello before the name is freed",
    "reserved_names": "comma-separated names nobody may claim",
    "queue_budget": "bytes each connection's receive queue at the broker may hold",
    "handshake_timeout": "seconds a new TCP connection has to finish its ZeroMQ handshake",
    "max_refusals": "refusals that ignore retry_after a user may draw in 10 s before its connections are cut; an address may have a tenth as many refused handshakes (0: no limit)",
    "cooloff": "seconds a user (or address) cut for ignoring retry_after is refused at the handshake",
    "registration": "who may claim a new name: 'open' (anyone), 'invite' (with a code from `zchat admin invite`) or 'closed' (admins only)",
    "admins": "comma-separated broker admins, by name or by Z85 public key (`zchat keys list` shows yours)",
    "send_budget": f"bytes each connection's send queue at the broker may hold (at least {MIN_SEND_BUDGET})",
    "retain_days": "days of history the broker keeps; older messages are pruned in the background (0: all)",
    "retain_messages": "messages the broker keeps a room, the newest; older ones are pruned in the background (0: all)",
    "talk_remember": "zchat talk keeps where you left off (DATA_DIR/cursors) and shows what was said since",
    "talk_bell": "zchat talk rings the terminal bell on a mention of your name or a direct message",
    "talk_desktop": "zchat talk shows a desktop notification on a mention of your name or a direct message",
    "talk_notify": "how talk's desktop notifications go: auto (notify-send if installed, else OSC 777), osc777, osc9, notify-send or none",
}


def env_var(name: str) -> str:
    """The environment variable that sets ``name``: ``ZCHAT_`` plus its name in capitals."""
    return ENV_PREFIX + name.upper()


# ------------------------------------------------------------------ values


def _fail(name: str, source: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"setting {name!r} from {source}: expected {expected}, got {value!r}")


def _to_type(name: str, value: Any, source: str, from_text: bool) -> Any:
    """Turn ``value`` into the field's type. Text (env, flags) is parsed; TOML values
    must already have the right type (an integer is fine where a float is wanted)."""
    kind = type(FIELDS[name].default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        word = value.strip().lower() if from_text and isinstance(value, str) else None
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        raise _fail(name, source, value, "true or false")
    if kind is str:
        if isinstance(value, str):
            return value.strip() if from_text else value
        raise _fail(name, source, value, "a string")
    if isinstance(value, bool):  # bool is an int subclass; true is never a number here
        raise _fail(name, source, value, f"a number ({kind.__name__})")
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_text and isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""), 10)
            except ValueError:
                pass
        raise _fail(name, source, value, "an integer")
    if kind is float:
        if isinstance(value, (int, float)):
            number = float(value)
        elif from_text and isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _fail(name, source, value, "a number") from None
        else:
            raise _fail(name, source, value, "a number")
        if not math.isfinite(number):
            raise _fail(name, source, value, "a finite number")
        return number
    raise AssertionError(f"no coercion for {kind}")  # pragma: no cover


def _check_endpoint(name: str, value: str, source: str) -> str:
    if name == "broker" and "," in value:  # several brokers of one set: each address checked
        for one in value.split(","):
            _check_endpoint(name, one.strip(), source)
        return value
    endpoint = value
    if name == "broker" and "#" in value:  # a keyed address: tcp://HOST:PORT#k=KEY
        from zchat.keys import split_address

        try:
            endpoint, _ = split_address(value)
        except ValueError as exc:
            raise _fail(name, source, value, f"tcp://HOST:PORT or tcp://HOST:PORT#k=KEY ({exc})") from None
    m = _ENDPOINT_RE.match(endpoint)
    # The broker binds PORT to PORT+3 (PORT+3: its plain key endpoint), so PORT may be
    # at most 65532; a broker bound to port 0 picks free ports (useful in tests).
    lowest = 0 if name == "bind" else 1
    if not m or not lowest <= int(m["port"]) <= 65532:
        raise _fail(name, source, value, f"an endpoint tcp://HOST:PORT with PORT from {lowest} to 65532")
    return value


def _validate(name: str, value: Any, source: str) -> Any:
    """Check the meaning of an already-typed value; returns it, maybe normalised."""
    if name in ("broker", "bind"):
        return _check_endpoint(name, value, source)
    if name == "name":
        if value and not valid_name(value):
            raise _fail(name, source, value, "a name of 1-32 lowercase letters, digits, _ or - (starting with a letter or digit)")
        return value
    if name == "storage":
        if value == "sqlite" or value.startswith(STORAGE_SCHEMES):
            return value
        raise _fail(name, source, value, "'sqlite' or a redis:// URL")
    if name == "log_level":
        level = value.upper()
        if level == "WARN":
            level = "WARNING"
        if level not in LOG_LEVELS:
            raise _fail(name, source, value, "one of " + ", ".join(LOG_LEVELS))
        return level
    if name == "log_format":
        fmt = value.lower()
        if fmt not in LOG_FORMATS:
            raise _fail(name, source, value, "'text' or 'json'")
        return fmt
    if name == "heartbeat":
        if value <= 0:
            raise _fail(name, source, value, "a number above 0")
        return value
    if name == "rate":
        if value < 0:
            raise _fail(name, source, value, "0 (no limit) or a number above 0")
        return value
    if name in ("request_rate", "room_rate"):
        if value < 0:
            raise _fail(name, source, value, "0 (no limit) or a number above 0")
        return value
    if name == "max_rooms":
        if value < 1:
            raise _fail(name, source, value, "a positive integer")
        return value
    if name == "burst":
        if value < 1:
            raise _fail(name, source, value, "a number of at least 1")
        return value
    if name in ("max_per_address", "claim_timeout", "handshake_timeout", "cooloff"):
        if value <= 0:
            raise _fail(name, source, value, "a number above 0")
        return value
    if name in ("max_connections", "claims_per_minute", "max_refusals"):
        if value < 0:
            raise _fail(name, source, value, "0 or a positive integer")
        return value
    if name == "registration":
        if value not in ("open", "invite", "closed"):
            raise _fail(name, source, value, "'open', 'invite' or 'closed'")
        return value
    if name == "admins":
        return ",".join(dict.fromkeys(a.strip() for a in value.split(",") if a.strip()))
    if name == "reserved_names":
        names = [n.strip() for n in value.split(",") if n.strip()]
        bad = [n for n in names if not valid_name(n)]
        if bad:
            raise _fail(name, source, value, f"comma-separated chat names ({bad[0]!r} is not one)")
        return ",".join(dict.fromkeys(names))
    if name == "queue_budget":
        if value < MIN_QUEUE_BUDGET:
            raise _fail(name, source, value, f"at least {MIN_QUEUE_BUDGET} bytes")
        return value
    if name == "send_budget":
        if value < MIN_SEND_BUDGET:
            raise _fail(name, source, value, f"at least {MIN_SEND_BUDGET} bytes")
        return value
    if name == "max_bytes":
        if not 1 <= value <= MAX_MESSAGE_BYTES:
            raise _fail(name, source, value, f"an integer from 1 to {MAX_MESSAGE_BYTES}")
        return value
    if name == "talk_notify":
        from zchat.tui.notify import METHODS

        if value not in METHODS:
            raise _fail(name, source, value, "one of " + ", ".join(METHODS))
        return value
    if name in ("retain_days", "retain_messages"):
        if value < 0:
            raise _fail(name, source, value, "0 (keep everything) or a number above 0")
        return value
    return value


def coerce(name: str, value: Any, source: str = "a flag", from_text: bool = True) -> Any:
    """The typed, checked value of setting ``name``; raises ConfigError naming ``source``."""
    if name not in FIELDS:
        raise ConfigError(f"unknown setting {name!r}{_suggest(name)}")
    return _validate(name, _to_type(name, value, source, from_text), source)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(FIELDS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------ file


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's settings by field name, typed and checked; raises ConfigError."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    values: dict[str, Any] = {}
    source = f"file {path}"
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if isinstance(value, dict):
            raise ConfigError(
                f"config file {path}: [{raw_key}] is a table; zchat's keys are flat, top-level "
                f"keys (for example: log-level = \"DEBUG\")"
            )
        if key not in FIELDS:
            raise ConfigError(
                f"config file {path}: unknown key {raw_key!r}{_suggest(key)}; known keys: {', '.join(FIELDS)}"
            )
        values[key] = _validate(key, _to_type(key, value, f"{source} (key {raw_key!r})", False), source)
    return values


def resolve_config_path(
    config_path: str | Path | None, env: Mapping[str, str] | None = None
) -> tuple[Path, bool]:
    """The config file to read and whether it was named explicitly (so must exist)."""
    env = os.environ if env is None else env
    if config_path:
        return Path(config_path).expanduser(), True
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser(), True
    return default_config_path(env), False


def load_settings(
    flags: Mapping[str, Any] | None = None,
    config_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Merge defaults < file < environment < flags; flags that are None are unset.

    ``sources`` maps every setting to ``"default"``, ``"file PATH"``,
    ``"env ZCHAT_X"`` or ``"flag"``. Raises ConfigError for a missing explicit
    config file, a bad file or any bad value.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources = {name: "default" for name in FIELDS}
    path, explicit = resolve_config_path(config_path, env)
    if path.exists():
        source = f"file {path}"
        for key, value in read_config_file(path).items():
            values[key], sources[key] = value, source
    elif explicit:
        how = "--config" if config_path else CONFIG_ENV
        raise ConfigError(f"config file {path} (from {how}) does not exist")
    for key in FIELDS:
        var = env_var(key)
        raw = env.get(var)
        if raw is not None and raw != "":
            values[key], sources[key] = coerce(key, raw, f"env {var}"), f"env {var}"
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in FIELDS:
            raise ConfigError(f"unknown setting {key!r}{_suggest(key)}")
        flag = "--" + key.replace("_", "-")
        values[key], sources[key] = coerce(key, value, f"flag {flag}"), "flag"
    return Settings(**values), sources


# ------------------------------------------------------------------ secrets


def secret_path(name: str) -> Path:
    if not valid_name(name):
        raise ConfigError(f"cannot keep a secret for {name!r}: not a valid chat name")
    return config_dir() / "secrets" / name


def load_secret(name: str) -> str:
    """The secret that proves this machine owns ``name``; made on first use, mode 0600.

    Safe against two processes starting at once: the secret is written to a temporary
    file and linked into place, so every caller reads the same, complete token.
    """
    path = secret_path(name)
    token = _read_secret(path)
    if token:
        return token
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race; use its token
    finally:
        tmp.unlink(missing_ok=True)
    token = _read_secret(path)
    if not token:
        raise ConfigError(f"secret file {path} is empty; delete it to make a new one")
    return token


def _read_secret(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return ""
    if mode & 0o077:
        os.chmod(path, 0o600)  # someone loosened it; a secret is for its owner only
    return path.read_text().strip()
