"""Options and helpers shared by the client commands: settings, running a client, errors."""

from __future__ import annotations

import asyncio
import functools
import getpass
import hashlib
import logging
import socket
import sys
from typing import Any, Awaitable, Callable, TypeVar

import click

from zchat import config as cfg
from zchat.client import AuthError, Client, ClientError, ConnectError

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Exit codes of the client commands (documented in their --help).
EXIT_REFUSED = 1  # the broker answered no (name taken, rate limited, unknown room...)
EXIT_UNREACHABLE = 3  # no answer from the broker in time


def client_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--broker, --name and --config for every command that talks to a broker."""
    func = click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML settings file.")(func)
    func = click.option("--name", "-n", help="Your chat name (lowercase a-z, 0-9, _ -). [env ZCHAT_NAME]")(func)
    func = click.option("--broker", "-b", help="Broker address, tcp://HOST:PORT or tcp://HOST:PORT#k=KEY (quote it); several brokers of one set comma-separated, each with its own #k=. [env ZCHAT_BROKER; default tcp://127.0.0.1:5555]")(func)
    func = click.option(
        "--trust-new-broker", is_flag=True, default=False, expose_value=False, callback=_trust_new,
        help="Pin an unknown non-loopback broker's key on first use (check its fingerprint first).",
    )(func)
    func = click.option(
        "--invite", expose_value=False, callback=_invite, metavar="CODE",
        help="Invite code for claiming a new name on a broker with --registration invite.",
    )(func)
    return func


#: --invite of this command.
INVITE = ""


def _invite(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    global INVITE
    if value:
        INVITE = value
    return value


#: --trust-new-broker of this command (client commands run one client each).
TRUST_NEW_BROKER = False


def _trust_new(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    global TRUST_NEW_BROKER
    TRUST_NEW_BROKER = TRUST_NEW_BROKER or bool(value)
    return value


def settings(config_path: str | None, **flags: Any) -> cfg.Settings:
    try:
        return cfg.load_settings(flags, config_path)[0]
    except cfg.ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def fallback_name() -> str:
    """A stable per-user, per-machine name, for ping, who and rooms without --name only
    when the broker predates look-only sessions (see Client.looker)."""
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    return "cli-" + hashlib.sha256(who.encode()).hexdigest()[:8]


def require_name(s: cfg.Settings) -> str:
    if not s.name:
        raise click.UsageError("no name: give --name NAME (or set ZCHAT_NAME, or name = \"...\" in the config file)")
    return s.name


def run_client(broker: str, name: str | None, body: Callable[[Client], Awaitable[T]], timeout: float = 5.0) -> T:
    """Connect, run ``body``, close; broker problems become clear messages and exit codes.
    With no ``name`` the session only looks (claims no name, needs no secret)."""

    async def main() -> T:
        trust = TRUST_NEW_BROKER
        client = Client(broker, name, trust_new_broker=trust, invite=INVITE) if name else Client.looker(broker, trust_new_broker=trust)
        try:
            await client.connect(timeout=timeout)
        except AuthError:
            if name:
                raise
            # a broker from before look-only sessions: look under this machine's own name
            log.info("the broker refused a look-only session; using %s", fallback_name())
            client = Client(broker, fallback_name(), trust_new_broker=trust)
            await client.connect(timeout=timeout)
        try:
            return await body(client)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except AuthError as exc:
        fail(EXIT_REFUSED, exc.message)
    except ConnectError as exc:
        fail(EXIT_UNREACHABLE, exc.message)
    except asyncio.TimeoutError:
        fail(EXIT_UNREACHABLE, f"the broker at {broker} did not confirm in time")
    except ClientError as exc:
        fail(EXIT_REFUSED, f"{exc.message} [{exc.code}]")
    except (ValueError, cfg.ConfigError) as exc:
        raise click.UsageError(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)
    raise AssertionError("unreachable")


def fail(code: int, message: str) -> None:
    click.echo(f"zchat: error: {message}", err=True)
    sys.exit(code)


def with_settings(func: Callable[..., Any]) -> Callable[..., Any]:
    """Resolve --broker/--name/--config into ``s: Settings`` for the command."""

    @functools.wraps(func)
    def wrapper(broker: str | None, name: str | None, config_path: str | None, **kwargs: Any) -> Any:
        return func(settings(config_path, broker=broker, name=name), **kwargs)

    return wrapper
