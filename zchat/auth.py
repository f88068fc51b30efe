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

from zchat import protocol as p


@dataclasses.dataclass(frozen=True)
class Verdict:
    status: bytes  # ZAP status code: b"200" accepted, b"400" refused
    text: str
    user_id: str = ""
    claim: bytes | None = None  # a digest to store: the name is new and now taken


def digest(secret: bytes) -> bytes:
    return hashlib.sha256(b"zchat-secret:" + secret).digest()


def check_plain(name_raw: bytes, secret: bytes, stored: bytes | None) -> Verdict:
    """Decide a PLAIN handshake given the digest stored for the name (None: unclaimed)."""
    try:
        name = name_raw.decode("ascii")
    except UnicodeDecodeError:
        return Verdict(b"400", "bad name: not ASCII")
    if not p.valid_name(name):
        return Verdict(b"400", f"bad name {name!r}: use a-z, 0-9, '_', '-' (max {p.MAX_NAME_LEN})")
    if len(secret) < 16:
        return Verdict(b"400", "secret too short")
    mine = digest(secret)
    if stored is None:
        return Verdict(b"200", "OK", name, claim=mine)
    if hmac.compare_digest(mine, stored):
        return Verdict(b"200", "OK", name)
    return Verdict(b"400", f"name {name!r} is taken")
