"""Who may use a name: the ZAP decision, sans I/O.

Open mode binds a name to the first secret presented with it (PLAIN: username = name,
password = the client's secret). Secrets are 256-bit random tokens made by the client,
so a plain SHA-256 digest is enough (a slow KDF guards low-entropy passwords, which
these are not) and keeps thousands of handshakes cheap.

CURVE (the default): a name is owned by public keys. The users table keeps, in the
digest column, ``b"curve:"`` and the owner's raw 32-byte keys one after the other (one
per device); a PLAIN-era row keeps its 32-byte secret digest until it is moved. A key
that owns nothing gets a look-only session, from which it may claim a name (the
broker's Claim request records an :class:`Intent`; the next handshake of that key
finishes it). See docs/protocol.md "Keys and names".
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time
from typing import Collection

from zchat import protocol as p


@dataclasses.dataclass(frozen=True)
class Verdict:
    status: bytes  # ZAP status code: b"200" accepted, b"400" refused
    text: str
    user_id: str = ""
    claim: bytes | None = None  # a digest to store: the name is new and now taken
    metadata: bytes = b""  # ZAP metadata (ZMTP properties) the broker reads on messages


_LOOKER = p.LOOKER.encode()


def digest(secret: bytes) -> bytes:
    return hashlib.sha256(b"zchat-secret:" + secret).digest()


MIN_SECRET = 16  # bytes; the client's secrets are 43-character random tokens


def check_plain(name_raw: bytes, secret: bytes, stored: bytes | None, reserved: Collection[str] = ()) -> Verdict:
    """Decide a PLAIN handshake given the digest stored for the name (None: unclaimed).

    ``protocol.LOOKER`` with any long enough secret is a look-only session: accepted as
    User-Id ``*``, never claimed (nobody can own it). A name in ``reserved`` cannot be
    claimed; one owned before it was reserved keeps working for its owner.
    """
    if name_raw == _LOOKER:
        if len(secret) < MIN_SECRET:
            return Verdict(b"400", "secret too short")
        return Verdict(b"200", "OK", p.LOOKER)
    try:
        name = name_raw.decode("ascii")
    except UnicodeDecodeError:
        return Verdict(b"400", "bad name: not ASCII")
    if not p.valid_name(name):
        return Verdict(b"400", f"bad name {name!r}: use a-z, 0-9, '_', '-' (max {p.MAX_NAME_LEN})")
    if len(secret) < MIN_SECRET:
        return Verdict(b"400", "secret too short")
    mine = digest(secret)
    if stored is None:
        if name in reserved:
            return Verdict(b"400", f"name {name!r} is reserved: pick another")
        return Verdict(b"200", "OK", name, claim=mine)
    if hmac.compare_digest(mine, stored):
        return Verdict(b"200", "OK", name)
    return Verdict(b"400", f"name {name!r} is taken")


# ------------------------------------------------------------------ CURVE

KEY_TAG = b"curve:"
REGISTRATION = ("open", "invite", "closed")
MAX_DEVICES = 16  # keys a name may have
MAX_REVOKED = 100_000  # revoked keys remembered (stored; the newest kept)
MAX_INVITES = 10_000  # unused invite codes kept at once (stored, so across restarts)
INVITE_TTL = 7 * 24 * 3600.0  # seconds an invite code stays good (wall clock: survives a restart)


def check_registration(mode: str) -> str:
    if mode not in REGISTRATION:
        raise ValueError(f"registration must be one of {', '.join(REGISTRATION)}, got {mode!r}")
    return mode


def key_digest(keys: Collection[bytes]) -> bytes:
    """The users-table value for a name owned by ``keys`` (raw 32-byte public keys)."""
    return KEY_TAG + b"".join(keys)


def owner_keys(stored: bytes | None) -> list[bytes]:
    """The raw keys that own a stored name (empty: unclaimed or a PLAIN-era secret)."""
    if not stored or not stored.startswith(KEY_TAG):
        return []
    body = stored[len(KEY_TAG):]
    return [body[i : i + 32] for i in range(0, len(body) - 31, 32)]


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value


def looker(key: bytes) -> Verdict:
    """A key that owns no name: a look-only session that carries its key (Z85) in the
    ``X-Key`` message property, so that a Claim on it knows which key asks."""
    from zmq.utils import z85

    return Verdict(b"200", "OK", p.LOOKER, metadata=_property(b"X-Key", z85.encode(key)))


def owned(name: str, key: bytes) -> Verdict:
    """The key owns ``name``; its Z85 text rides along as ``X-Key`` (for keys requests)."""
    from zmq.utils import z85

    return Verdict(b"200", "OK", name, metadata=_property(b"X-Key", z85.encode(key)))


def is_admin(name: str, key: bytes, admins: Collection[str]) -> bool:
    """Admins are named in the broker's settings by name or by Z85 public key."""
    from zmq.utils import z85

    return name in admins or z85.encode(key).decode() in admins


def may_register(name: str, reserved: Collection[str], mode: str, admin: bool, invite: str) -> str:
    """Why a new name may not be claimed now ('' if it may). An invite code given is
    checked (and used, in one step) by storage afterwards (INVITE_REFUSED)."""
    if name in reserved and not admin:
        return f"name {name!r} is reserved: pick another"
    if admin or mode == "open":
        return ""
    if mode == "closed":
        return "registration is closed on this broker: ask its admin to add you"
    if not invite:
        return "this broker takes new names by invitation: give an invite code (--invite)"
    return ""


INVITE_REFUSED = "that invite code is not valid (used, expired or made up)"


def needs_invite(mode: str, admin: bool) -> bool:
    """Whether a new name's claim uses up an invite code."""
    return mode == "invite" and not admin


@dataclasses.dataclass(frozen=True)
class Intent:
    name: str
    secret: str
    invite: str
    deadline: float


class Intents:
    """Claims asked for on a look-only connection, by key, until the key's next handshake."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self.by_key: dict[bytes, Intent] = {}

    def add(self, key: bytes, req: p.Claim, deadline: float) -> bool:
        if key not in self.by_key and len(self.by_key) >= self.limit:
            self.by_key = {k: v for k, v in self.by_key.items() if v.deadline > time.monotonic()}
            if len(self.by_key) >= self.limit:
                return False
        self.by_key[key] = Intent(req.name, req.secret, req.invite, deadline)
        return True

    def take(self, key: bytes, now: float) -> Intent | None:
        intent = self.by_key.pop(key, None)
        if intent is None or intent.deadline < now:
            return None
        return intent


def new_invite_code() -> str:
    """A one-use invite code: 16 URL-safe characters (96 random bits), stored by the
    broker with its expiry (Storage.add_invite) so a restart keeps it."""
    return secrets.token_urlsafe(12)
