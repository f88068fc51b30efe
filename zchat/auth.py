"""Who may use a name: the ZAP decision, sans I/O.

Open mode binds a name to the first secret presented with it (PLAIN: username = name,
password = the client's secret). Secrets are 256-bit random tokens made by the client,
so a plain SHA-256 digest is enough (a slow KDF guards low-entropy passwords, which
these are not) and keeps thousands of handshakes cheap. A CURVE mechanism would map
the client's public key to a name here and return the same verdict shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from typing import Collection

from zchat import protocol as p


@dataclasses.dataclass(frozen=True)
class Verdict:
    status: bytes  # ZAP status code: b"200" accepted, b"400" refused
    text: str
    user_id: str = ""
    claim: bytes | None = None  # a digest to store: the name is new and now taken


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
