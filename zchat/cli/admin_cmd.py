"""``zchat admin``: broker administration by the admins named in its settings."""

from __future__ import annotations

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


COMMANDS = [admin_group]
