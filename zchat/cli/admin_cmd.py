"""``zchat admin``: broker administration by the admins named in its settings."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import click

from zchat.cli.options import client_options, require_name, run_client, with_settings
from zchat.client import Client
from zchat.config import Settings

EXIT_CODES = "Exit status: 0 done, 1 refused by the broker, 2 bad usage, 3 broker unreachable."


@click.group("admin")
def admin_group() -> None:
    """Broker administration (your --name or key must be in the broker's `admins`)."""


@admin_group.command("invite", epilog=EXIT_CODES)
@client_options
@click.option("--count", type=click.IntRange(1, 100), default=1, show_default=True, help="How many codes.")
@with_settings
def invite(s: Settings, count: int) -> None:
    """Print one-use invite codes, one a line, for a broker with --registration invite.

    \b
    Example:
      zchat admin invite --name boss        # then: zchat talk --name carol --invite CODE
    """
    name = require_name(s)

    async def body(client: Client) -> list[str]:
        return [await client.make_invite() for _ in range(count)]

    for code in run_client(s.broker, name, body):
        click.echo(code)


def _admin(s: Settings, call: Callable[[Client], Awaitable[None]], done: str) -> None:
    run_client(s.broker, require_name(s), call)
    click.echo(done, err=True)


@admin_group.command("ban", epilog=EXIT_CODES)
@client_options
@click.argument("user")
@with_settings
def ban(s: Settings, user: str) -> None:
    """Ban USER from the broker: refused at every handshake, live sessions cut."""
    _admin(s, lambda c: c.admin_ban(user.lower()), f"{user} banned")


@admin_group.command("unban", epilog=EXIT_CODES)
@client_options
@click.argument("user")
@with_settings
def unban(s: Settings, user: str) -> None:
    """Lift USER's broker ban."""
    _admin(s, lambda c: c.admin_unban(user.lower()), f"{user} unbanned")


@admin_group.command("delete", epilog=EXIT_CODES)
@client_options
@click.argument("room")
@click.argument("seq", type=click.IntRange(1))
@with_settings
def delete(s: Settings, room: str, seq: int) -> None:
    """Delete line SEQ of ROOM (seqs: `zchat tail --json`): a tombstone replaces it in
    history and every client hides it."""
    _admin(s, lambda c: c.delete(room.lstrip("#").lower(), seq), f"line {seq} of {room} deleted")


@admin_group.command("release", epilog=EXIT_CODES)
@client_options
@click.argument("user")
@with_settings
def release(s: Settings, user: str) -> None:
    """Release the (squatted) name USER: out of every room, its keys refused, free to claim."""
    _admin(s, lambda c: c.release(user.lower()), f"{user} released")


COMMANDS = [admin_group]
