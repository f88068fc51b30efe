"""``zchat bot``: a scripted participant that talks through zchat.client."""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from zchat.cli.options import EXIT_REFUSED, EXIT_UNREACHABLE, client_options, fail, require_name, settings
from zchat.logs import setup_logging

EXIT_CODES = "Exit status: 0 done, 1 name refused by the broker, 2 bad usage, 3 broker unreachable."


@click.command("bot", epilog=EXIT_CODES)
@client_options
@click.option("--room", "-r", required=True, help="Room to join and talk in.")
@click.option("--every", type=float, default=5.0, show_default=True, help="Seconds between numbered lines.")
@click.option("--count", type=int, default=0, show_default=True, help="Lines to say, then leave (0: forever).")
@click.option("--reply", is_flag=True, help="Answer lines of others that mention the bot's name.")
@click.option(
    "--say",
    default=None,
    metavar="TEMPLATE",
    help="Line template with {n}, {name} and {peer} [default: 'hello {peer}, this is line {n}'].",
)
@click.option("--wait", "connect_for", type=float, default=60.0, show_default=True, help="Seconds to keep trying to reach the broker.")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR [env ZCHAT_LOG_LEVEL].")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None, help="Log format [env ZCHAT_LOG_FORMAT].")
def bot(
    broker: str | None,
    name: str | None,
    config_path: str | None,
    room: str,
    every: float,
    count: int,
    reply: bool,
    say: str | None,
    connect_for: float,
    log_level: str | None,
    log_format: str | None,
) -> None:
    """Run a small bot that says numbered lines and answers mentions.

    It joins ROOM, says a line every --every seconds (--count of them, or
    forever) and prints everything it hears in ROOM on stdout. With --reply it
    answers lines of others that mention its name with 're @SENDER: ...'
    (replies are never answered, so bots cannot loop). Stop it with Ctrl-C.

    \b
    Examples:
      zchat bot --name alice --room lobby --every 2 --reply
      zchat bot --name bob --room lobby --count 5 --say "line {n} from {name}"
      ZCHAT_BROKER=tcp://broker:5555 zchat bot --name carol --room lobby --reply
    """
    from zchat.bot import DEFAULT_SAY, BotOptions, run_bot
    from zchat.client import AuthError, ClientError, ConnectError

    s = settings(config_path, broker=broker, name=name, log_level=log_level, log_format=log_format)
    bot_name = require_name(s)
    setup_logging(s.log_level, s.log_format)
    try:
        options = BotOptions(room=room, every=every, count=count, reply=reply, say=say or DEFAULT_SAY)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    def out(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        bot_ = await run_bot(s.broker, bot_name, options, connect_for=connect_for, out=out, stop=stop)
        out(f"{bot_name} said {bot_.said} lines, replied {bot_.replied} times")

    try:
        asyncio.run(main())
    except AuthError as exc:
        fail(EXIT_REFUSED, exc.message)
    except ConnectError as exc:
        fail(EXIT_UNREACHABLE, exc.message)
    except ClientError as exc:
        fail(EXIT_REFUSED, f"{exc.message} [{exc.code}]")


COMMANDS = [bot]
