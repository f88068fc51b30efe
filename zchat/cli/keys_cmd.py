"""``zchat keys``: this device's key for a name, and the keys (devices) that own it."""

from __future__ import annotations

import click

from zchat import keys
from zchat.cli.options import client_options, require_name, run_client, with_settings
from zchat.client import Client
from zchat.config import ConfigError, Settings, load_secret

EXIT_CODES = "Exit status: 0 done, 1 refused by the broker, 2 bad usage, 3 broker unreachable."


@click.group("keys")
def keys_group() -> None:
    """Your identity keys: one per name and device (made from CONFIG_DIR/secrets/NAME).

    \b
    A second device: on it run `zchat keys show --name NAME`, then on a device the
    broker already knows run `zchat keys add KEY --name NAME`. Or copy the secret file.
    """


@keys_group.command("show", epilog=EXIT_CODES)
@client_options
@with_settings
def show(s: Settings) -> None:
    """Print this device's public key for --name (made on first use), and its fingerprint."""
    name = require_name(s)
    try:
        public, _ = keys.keypair_from_secret(load_secret(name), name)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(public.decode())
    click.echo(f"fingerprint {keys.fingerprint(public)}", err=True)


@keys_group.command("list", epilog=EXIT_CODES)
@client_options
@with_settings
def list_(s: Settings) -> None:
    """List the keys that own --name at the broker (this device's is marked *)."""
    name = require_name(s)

    async def body(client: Client) -> list[str]:
        return await client.list_keys()

    mine = keys.keypair_from_secret(load_secret(name), name)[0].decode()
    for key in run_client(s.broker, name, body):
        click.echo(f"{'*' if key == mine else ' '} {key}  {keys.fingerprint(key)}")


@keys_group.command("add", epilog=EXIT_CODES)
@client_options
@click.argument("key")
@with_settings
def add(s: Settings, key: str) -> None:
    """Authorise another device's public KEY for --name (run on an authorised device)."""
    name = require_name(s)
    if not keys.valid_key(key):
        raise click.UsageError("KEY must be a 40-character Z85 public key (from `zchat keys show` on that device)")

    async def body(client: Client) -> None:
        await client.add_key(key)

    run_client(s.broker, name, body)
    click.echo(f"authorised {keys.fingerprint(key)} for {name}", err=True)


@keys_group.command("revoke", epilog=EXIT_CODES)
@client_options
@click.argument("key")
@with_settings
def revoke(s: Settings, key: str) -> None:
    """Revoke KEY for --name: refused from its next handshake, its live sessions cut."""
    name = require_name(s)
    if not keys.valid_key(key):
        raise click.UsageError("KEY must be a 40-character Z85 public key (see `zchat keys list`)")

    async def body(client: Client) -> None:
        await client.revoke_key(key)

    run_client(s.broker, name, body)
    click.echo(f"revoked {keys.fingerprint(key)} for {name}", err=True)


COMMANDS = [keys_group]
