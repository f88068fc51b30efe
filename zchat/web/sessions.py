"""Sign-in sessions of the web gateway, carried by a cookie.

The cookie holds a random token (256 bits); the gateway keeps only its SHA-256, so a
memory dump or a log line with the table's keys lets nobody sign in. Sessions live in
memory: restarting the gateway signs everyone out (their tabs show the sign-in form
and nothing is lost: history fills their rooms again). The table is bounded: the
least recently used session goes first, and one idle longer than ``idle`` expires.

The cookie is HttpOnly (page scripts cannot read it, so injected script could not
steal it), SameSite=Strict (no other site's page can send it along: a first line
against cross-site request forgery, with the Origin check as the second), and Secure
when the page is served over TLS, directly or behind a TLS proxy (``secure``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import secrets
import time
from collections.abc import Callable

COOKIE = "zchat_session"
IDLE = 7 * 24 * 3600.0  # seconds a session lasts without use
MAX_SESSIONS = 20_000


@dataclasses.dataclass
class Session:
    name: str
    key: str  # the token's digest: the table's key
    last: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    """token -> signed-in name, bounded in number and in idle time."""

    def __init__(self, idle: float = IDLE, max_sessions: int = MAX_SESSIONS, clock: Callable[[], float] = time.time) -> None:
        self.idle = idle
        self.max_sessions = max_sessions
        self.clock = clock
        self._table: collections.OrderedDict[str, Session] = collections.OrderedDict()

    def create(self, name: str) -> tuple[str, Session]:
        """A new session for ``name``: (the token for the cookie, the session)."""
        token = secrets.token_urlsafe(32)
        session = Session(name, _digest(token), self.clock())
        self._table[session.key] = session
        while len(self._table) > self.max_sessions:
            self._table.popitem(last=False)
        return token, session

    def get(self, token: str | None) -> Session | None:
        """The live session of ``token`` (its use renews it), or None."""
        if not token or len(token) > 100:
            return None
        key = _digest(token)
        session = self._table.get(key)
        if session is None:
            return None
        now = self.clock()
        if now - session.last > self.idle:
            del self._table[key]
            return None
        session.last = now
        self._table.move_to_end(key)
        return session

    def end(self, token: str | None) -> Session | None:
        """Sign out: forget the session of ``token`` (returned, or None)."""
        if not token:
            return None
        return self._table.pop(_digest(token), None)

    def __len__(self) -> int:
        return len(self._table)


def cookie_flags(secure: bool, max_age: float = IDLE) -> dict[str, object]:
    """Keyword arguments for aiohttp's ``set_cookie``: the flags the module docstring argues."""
    flags: dict[str, object] = {"httponly": True, "samesite": "Strict", "path": "/", "max_age": int(max_age)}
    if secure:
        flags["secure"] = True
    return flags
