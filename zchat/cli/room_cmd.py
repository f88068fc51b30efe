"""``zchat room``: make a private room and run a room as its operator. Each command is
one call of ``zchat.client``; the broker stores each action as a line of the room."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import click

from zchat.cli.options import client_options, require_name, run_client, with_settings
from zchat.client import Client
from zchat.config import Settings

EXIT_CODES = "Exit status: 0 done, 1 refused by the broker (forbidden: not an operator), 2 bad usage, 3 broker unreachable."


def _room(value: str) -> str:
    return value.lstrip("#").lower()


@click.group("room")
def room_group() -> None:
    """Private rooms and moderation (operators: the room's creator and whom they promote)."""


def _run(s: Settings, action: Callable[[Client], Awaitable[None]], done: str) -> None:
    run_client(s.broker, require_name(s), action)
    click.echo(done, err=True)


@room_group.command("create", epilog=EXIT_CODES)
@client_options
@click.argument("room")
@with_settings
def create(s: Settings, room: str) -> None:
    """Create ROOM as a private room, with you as its operator (refused if it exists).

    \b
    Example:
      zchat room create --name alice secret-plans && zchat room invite --name alice secret-plans bob
    """
    room = _room(room)
    _run(s, lambda c: c.join(room, private=True), f"created private #{room}")  # type: ignore[arg-type,return-value]


def _on_user(verb: str, summary: str, reason: bool = False) -> click.Command:
    """``zchat room VERB ROOM NAME [REASON...]``: one operator action on a user."""

    @client_options
    @click.argument("room")
    @click.argument("user")
    @click.argument("why", nargs=-1)
    @with_settings
    def command(s: Settings, room: str, user: str, why: tuple[str, ...]) -> None:
        if why and not reason:
            raise click.UsageError(f"{verb} takes no reason")
        room, user = _room(room), user.lstrip("@").lower()
        method = getattr(Client, verb)
        extra = (" ".join(why),) if reason else ()
        _run(s, lambda c: method(c, room, user, *extra), f"{verb}: {user} in #{room}")

    command.__doc__ = summary
    return click.command(verb, epilog=EXIT_CODES)(command)


for _verb, _summary, _reason in (
    ("invite", "Invite USER to ROOM (a private room admits them at once).", False),
    ("kick", "Remove USER from ROOM, with an optional REASON.", True),
    ("ban", "Remove USER from ROOM and refuse their joins, with an optional REASON.", True),
    ("unban", "Lift USER's ban from ROOM.", False),
    ("op", "Make member USER an operator of ROOM.", False),
    ("deop", "Take operator status from USER in ROOM.", False),
):
    room_group.add_command(_on_user(_verb, _summary, _reason))


@room_group.command("topic", epilog=EXIT_CODES)
@client_options
@click.argument("room")
@click.argument("text", nargs=-1)
@with_settings
def topic(s: Settings, room: str, text: tuple[str, ...]) -> None:
    """Set ROOM's topic to TEXT (none: clear it)."""
    room = _room(room)
    _run(s, lambda c: c.set_topic(room, " ".join(text)), f"topic of #{room} set")


COMMANDS = [room_group]
