"""What the client library hands its callers: the errors it raises and the events it
emits (besides the protocol's Msg and Presence, and recovery's Gap)."""

from __future__ import annotations

import dataclasses

from zchat import protocol as p
from zchat.recovery import Gap


class ClientError(Exception):
    """The broker refused something; ``code`` is a protocol ErrorCode, ``retry_after``
    the seconds to wait first when it is rate_limited."""

    def __init__(self, code: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class AuthError(ClientError):
    """The handshake was refused: the name is taken (another secret owns it) or invalid."""


class ConnectError(ClientError):
    """The broker did not answer in time."""


class BrokerKeyError(ConnectError):
    """The broker's key is unknown (and may not be trusted on first use here) or is not
    the one pinned for it: nothing was sent to it. The message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class StateChange:
    """Connection state: ``connected``, ``reconnecting`` or ``closed``; ``since`` is time.time()."""

    state: str
    since: float
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Recovered:
    """``count`` messages of ``room`` came from history after a gap (not from live fan-out)."""

    room: str
    count: int


@dataclasses.dataclass(frozen=True)
class Problem:
    """The broker reported an error that names no request and no chat line (e.g. a frame
    it could not read at all), or a room could not be re-joined: shown, never dropped."""

    code: str
    message: str


Event = p.Msg | p.Presence | StateChange | Recovered | Gap | Problem
