"""``zchat irc``: an IRC server face on a zchat broker (zchat.irc)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import click

from zchat import config as cfg
from zchat.cli.options import settings

log = logging.getLogger(__name__)


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise click.BadParameter(f"use HOST:PORT, got {value!r}", param_hint="--listen")
    return host.strip("[]"), int(port)


@click.command("irc")
@click.option("--listen", default="127.0.0.1:6667", show_default=True, envvar="ZCHAT_IRC_LISTEN",
              help="Where IRC clients connect, HOST:PORT. [env ZCHAT_IRC_LISTEN]")
@click.option("--broker", "-b", help="Broker address, tcp://HOST:PORT or tcp://HOST:PORT#k=KEY. [env ZCHAT_BROKER]")
@click.option("--history", type=click.IntRange(0, 1000), default=50, show_default=True, envvar="ZCHAT_IRC_HISTORY",
              help="Earlier lines played back when a channel is joined. [env ZCHAT_IRC_HISTORY]")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate: serve IRC over TLS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key of --tls-cert.")
@click.option("--accounts-dir", type=click.Path(file_okay=False), envvar="ZCHAT_WEB_DATA_DIR",
              help="The accounts of `zchat web` (accounts.json). [env ZCHAT_WEB_DATA_DIR; default: web/ in the user data directory]")
@click.option("--no-accounts", is_flag=True, default=False,
              help="A personal gateway: the nick alone signs in, with this machine's own secrets (as `zchat talk`). Listen on loopback only.")
@click.option("--max-connections", type=click.IntRange(min=1), default=1000, show_default=True, help="IRC connections taken in all.")
@click.option("--max-per-address", type=click.IntRange(min=1), default=64, show_default=True, help="IRC connections taken from one address.")
@click.option("--server-name", default="zchat", show_default=True, help="The server name IRC clients see.")
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR. [INFO]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML settings file.")
def irc(
    listen: str, broker: str | None, history: int, tls_cert: str | None, tls_key: str | None, accounts_dir: str | None,
    no_accounts: bool, max_connections: int, max_per_address: int, server_name: str, log_level: str | None, config_path: str | None,
) -> None:
    """Let IRC clients (irssi, weechat, HexChat, bots) into zchat rooms.

    Channels are rooms (#general), /msg NICK is a direct message, /me an action.
    Sign in with SASL PLAIN or PASS with the same accounts as `zchat web`; a name's
    first sign-in makes its account and claims the name on the broker.

    \b
    Examples:
      zchat irc                                   # then: irssi -c localhost -p 6667 -n alice -w PASSWORD
      zchat irc --listen 0.0.0.0:6697 --tls-cert cert.pem --tls-key key.pem
      zchat irc --no-accounts                     # just for you: irssi -c localhost -p 6667 -n alice
    """
    from zchat.irc.server import Gateway, tls_context
    from zchat.irc.signin import Gatekeeper
    from zchat.logs import setup_logging

    s = settings(config_path, broker=broker, log_level=log_level)
    host, port = _listen(listen)
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("give both --tls-cert and --tls-key")
    if no_accounts and host not in ("127.0.0.1", "::1", "localhost"):
        raise click.UsageError("--no-accounts lets anyone who can connect speak as any name: listen on loopback only")
    setup_logging(s.log_level, s.log_format)
    if no_accounts:
        keeper = Gatekeeper(None)
    else:
        from zchat.accounts import AccountError, Accounts

        directory = Path(accounts_dir) if accounts_dir else cfg.data_dir() / "web"
        try:
            keeper = Gatekeeper(Accounts(directory))
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None
    tls = tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
    gateway = Gateway(
        s.broker, keeper, history=history, server_name=server_name, max_connections=max_connections, max_per_address=max_per_address,
    )

    async def main() -> None:
        try:
            bound = await gateway.start(host, port, tls)
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {listen}: {exc}") from None
        click.echo(f"zchat irc: listening on {host}:{bound}{' (TLS)' if tls else ''} for {s.broker}", err=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await gateway.stop()

    asyncio.run(main())


COMMANDS = [irc]
