"""``zchat broker``: run the broker."""

from __future__ import annotations

import asyncio
import logging

import click
import zmq

from zchat.cli.options import settings
from zchat.core import Limits

log = logging.getLogger(__name__)


@click.command("broker")
@click.option("--bind", help="ROUTER endpoint; PULL listens on port+1, PUB on port+2. [default tcp://127.0.0.1:5555]")
@click.option("--db", help="SQLite history file. [default: history.db in the user data directory]")
@click.option("--storage", help="'sqlite' (default) or a redis:// URL for several brokers.")
@click.option("--heartbeat", type=float, help="Seconds between client pings; silent for 3x that is offline. [10]")
@click.option("--rate", type=float, help="Messages per second per user, 0 for no limit. [20]")
@click.option("--burst", type=float, help="Messages a user may send at once before the rate applies. [100]")
@click.option("--max-bytes", type=int, help="Largest message body in bytes. [65536]")
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR. [INFO]")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or JSON. [text]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML settings file.")
def broker(config_path: str | None, **flags: object) -> None:
    """Run the chat broker until Ctrl-C or SIGTERM (history is closed cleanly).

    \b
    Examples:
      zchat broker
      zchat broker --bind tcp://0.0.0.0:5555 --db /srv/zchat/history.db
      zchat broker --log-format json --log-level DEBUG
    """
    from zchat.broker import serve
    from zchat.logs import setup_logging
    from zchat.storage import StorageError, open_storage

    s = settings(config_path, **flags)
    setup_logging(s.log_level, s.log_format)
    try:
        store = open_storage(s.storage, s.db_path())
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    limits = Limits(heartbeat=s.heartbeat, rate=s.rate, burst=s.burst, max_bytes=s.max_bytes)
    try:
        asyncio.run(serve(s.bind, store, limits))
    except StorageError as exc:
        raise click.ClickException(f"cannot open history: {exc}") from None
    except (OSError, zmq.ZMQError) as exc:  # address in use, unknown interface
        raise click.ClickException(f"cannot listen on {s.bind}: {exc}") from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


COMMANDS = [broker]
