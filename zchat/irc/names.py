"""IRC nicks and channels <-> zchat names and rooms.

IRC compares nicks and channels without case (CASEMAPPING=ascii), zchat names are
lower case: ``Alice`` is ``alice``. A channel is ``#`` + a room name. Anything that
does not map is refused, never rewritten into something else.
"""

from __future__ import annotations

from zchat import protocol as p

CHANNEL_PREFIX = "#"


def nick_to_name(nick: str) -> str | None:
    """The zchat name for an IRC nick, or None if it has no zchat form."""
    name = nick.lower() if nick.isascii() else ""
    return name if p.valid_name(name) else None


def channel_to_room(channel: str) -> str | None:
    """The zchat room for ``#room``, or None (other prefixes, characters outside the
    room rules, DM ids)."""
    if not channel.startswith(CHANNEL_PREFIX) or not channel.isascii():
        return None
    room = channel[1:].lower()
    return room if p.valid_room(room) else None


def room_to_channel(room: str) -> str:
    return CHANNEL_PREFIX + room


def is_channel(target: str) -> bool:
    """Looks like a channel (any of the RFC 2812 channel prefixes), mappable or not."""
    return target[:1] in "#&+!"
