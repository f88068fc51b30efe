"""``zchat broker``: run the broker."""

from __future__ import annotations

import asyncio
import logging

import click
import zmq

from zchat.cli.options import settings
from zchat.core import Limits
from zchat.guard import GuardConfig

log = logging.getLogger(__name__)


@click.command("broker")
@click.option("--bind", help="ROUTER endpoint; PULL listens on port+1, PUB on port+2. [default tcp://127.0.0.1:5555]")
@click.option("--db", help="SQLite history file. [default: history.db in the user data directory]")
@click.option("--storage", help="'sqlite' (default) or a redis:// URL for several brokers.")
@click.option("--heartbeat", type=float, help="Seconds between client pings; silent for 3x that is offline (a closed connection is offline at once). [120]")
@click.option("--rate", type=float, help="Messages per second per user, 0 for no limit. [20]")
@click.option("--burst", type=float, help="Messages a user may send at once before the rate applies. [100]")
@click.option("--max-bytes", type=int, help="Largest message body in bytes. [65536]")
@click.option("--request-rate", type=float, help="Requests per second per user (join, history, who...), 0 for no limit. [10]")
@click.option("--room-rate", type=float, help="Lines per second a room takes from all its senders, 0 for no limit. [200]")
@click.option("--max-rooms", type=int, help="Rooms and direct conversations per user. [500]")
@click.option("--max-per-address", type=int, help="TCP connections taken from one address on each port; more are cut. [64]")
@click.option("--max-connections", type=int, help="Connections taken in all; 0: the descriptor limit less a reserve. [0]")
@click.option("--claims-per-minute", type=int, help="New names one address may claim a minute, 0 for no limit. [5]")
@click.option("--claim-timeout", type=float, help="Seconds a new name's first connection has to say hello, or the name is freed. [30]")
@click.option("--reserved-names", help="Comma-separated names nobody may claim. [admin,root,system,zchat]")
@click.option("--queue-budget", type=int, help="Bytes each connection's receive queue may hold. [4194304]")
@click.option("--send-budget", type=int, help="Bytes each connection's send queue may hold (replies up to 1 MiB). [16777216]")
@click.option("--handshake-timeout", type=float, help="Seconds a new TCP connection has to finish its handshake. [5]")
@click.option("--max-refusals", type=int, help="Refusals ignoring retry_after a user may draw in 10 s before it is cut, 0 for no limit. [1000]")
@click.option("--cooloff", type=float, help="Seconds a user or address cut for ignoring retry_after is refused. [60]")
@click.option("--registration", type=click.Choice(["open", "invite", "closed"]), help="Who may claim a new name: anyone, holders of an invite code, or admins only. [open]")
@click.option("--admins", help="Comma-separated admins, by name or Z85 public key. [none]")
@click.option("--show-address", is_flag=True, default=False, help="Print the address to give users (it carries the broker's key; made on first use) and exit.")
@click.option("--retain-days", type=float, help="Days of history to keep; older messages are pruned in the background. [0: all]")
@click.option("--retain-messages", type=int, help="Messages to keep a room (the newest); older ones are pruned. [0: all]")
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR. [INFO]")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or JSON. [text]")
@click.option("--log-file", type=click.Path(dir_okay=False), help="Write logs to this file (rotated) instead of stderr.")
@click.option("--log-max-bytes", type=click.IntRange(min=0), default=10 * 1024 * 1024, show_default=True,
              help="Rotate the log file at this size (0: never).")
@click.option("--log-backups", type=click.IntRange(min=0), default=5, show_default=True, help="Rotated log files kept.")
@click.option("--metrics", "metrics", metavar="[HOST:]PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1). [off]")
@click.option("--metrics-public", is_flag=True, help="Allow --metrics on an address that is not loopback.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML settings file.")
def broker(
    config_path: str | None, log_file: str | None, log_max_bytes: int, log_backups: int,
    metrics: str | None, metrics_public: bool, show_address: bool, **flags: object,
) -> None:
    """Run the chat broker until Ctrl-C or SIGTERM (history is closed cleanly).

    \b
    Examples:
      zchat broker
      zchat broker --bind tcp://0.0.0.0:5555 --db /srv/zchat/history.db
      zchat broker --log-format json --log-level DEBUG
      zchat broker --metrics 127.0.0.1:9464 --log-file /var/log/zchat/broker.log
      zchat broker --bind tcp://0.0.0.0:5555 --show-address   # the address for users

    Every connection is CURVE-encrypted. The broker's keypair is made on first start
    next to its history file (broker.key, mode 0600) and reused; users get the key in
    the address (tcp://HOST:PORT#k=KEY) or pin it on first use (see the README).
    """
    from zchat.broker import serve
    from zchat.logs import setup_logging
    from zchat.metrics import MetricsError
    from zchat.storage import StorageError, open_storage

    s = settings(config_path, **flags)
    if show_address:
        from zchat import keys

        try:
            keys.require_curve()
            public, _ = keys.broker_keypair(s.db_path().parent)
        except (keys.KeyError_, OSError) as exc:
            raise click.ClickException(str(exc)) from None
        host_port = s.bind.replace("0.0.0.0", __import__("socket").gethostname(), 1)
        click.echo(keys.keyed_address(host_port, public))
        click.echo(f"fingerprint {keys.fingerprint(public)}", err=True)
        return
    if metrics:
        from zchat.metrics import parse_address

        try:
            parse_address(metrics, metrics_public)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise click.UsageError("--metrics needs prometheus-client (a dependency of zchat): pip install prometheus-client") from None
    try:
        setup_logging(s.log_level, s.log_format, log_file, log_max_bytes, log_backups)
    except OSError as exc:
        raise click.UsageError(f"cannot write --log-file {log_file}: {exc}") from None
    try:
        store = open_storage(s.storage, s.db_path())
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    limits = Limits(
        heartbeat=s.heartbeat, rate=s.rate, burst=s.burst, max_bytes=s.max_bytes, request_rate=s.request_rate,
        room_rate=s.room_rate, room_burst=max(1.0, 5 * s.room_rate), max_rooms=s.max_rooms,
    )
    guard = GuardConfig(
        max_per_address=s.max_per_address, max_connections=s.max_connections, claims_per_minute=s.claims_per_minute,
        claim_timeout=s.claim_timeout, reserved=s.reserved(), queue_budget=s.queue_budget, send_budget=s.send_budget,
        handshake_timeout=s.handshake_timeout, max_refusals=s.max_refusals, cooloff=s.cooloff,
    )
    from zchat.retention import RetentionPolicy

    retention = RetentionPolicy(days=s.retain_days, messages=s.retain_messages)
    try:
        asyncio.run(serve(
            s.bind, store, limits, guard, retention=retention, metrics=metrics, metrics_public=metrics_public,
            key_dir=s.db_path().parent, registration=s.registration, admins=s.admin_list(),
        ))
    except StorageError as exc:
        raise click.ClickException(f"cannot open history: {exc}") from None
    except MetricsError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, zmq.ZMQError) as exc:  # address in use, unknown interface
        raise click.ClickException(f"cannot listen on {s.bind}: {exc}") from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


COMMANDS = [broker]
