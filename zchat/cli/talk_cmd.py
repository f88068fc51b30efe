"""``zchat talk``: the full-screen chat, or a line mode without a terminal."""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from zchat import protocol as p
from zchat.cli.options import EXIT_REFUSED, EXIT_UNREACHABLE, client_options, fail, require_name, run_client, settings
from zchat.config import Settings, data_dir

EXIT_CODES = (
    "Exit status: 0 done, 1 refused by the broker (name taken, a line refused in line mode), "
    "2 bad usage, 3 broker unreachable (line mode)."
)
DEFAULT_HISTORY = 50


def _rooms(values: tuple[str, ...]) -> list[str]:
    rooms = []
    for value in values or ("general",):
        room = value.strip().lstrip("#").lower()
        if not p.valid_room(room):
            raise click.BadParameter(f"bad room name {value!r}: use a-z, 0-9, '_', '-', '.'", param_hint="--room")
        rooms.append(room)
    return list(dict.fromkeys(rooms))


def _prompt_name() -> str:
    while True:
        name = click.prompt("Your chat name (a-z, 0-9, _ -)").strip().lower()
        if p.valid_name(name):
            return name
        click.echo(f"{name!r} will not do: use 1-{p.MAX_NAME_LEN} of a-z, 0-9, '_' and '-'.", err=True)


@click.command("talk", epilog=EXIT_CODES)
@client_options
@click.option("--room", "-r", "room_values", multiple=True, help="Room to join; repeat for more. [default: general]")
@click.option("--plain", is_flag=True, help="Line mode: read lines from stdin, print one line per event.")
@click.option(
    "--history",
    type=click.IntRange(0, p.MAX_HISTORY),
    default=None,
    help=f"Earlier messages to show per room on start. [default: {DEFAULT_HISTORY} full-screen, 0 line mode]",
)
def talk(
    broker: str | None, name: str | None, config_path: str | None, room_values: tuple[str, ...], plain: bool, history: int | None
) -> None:
    """Chat: a full-screen client, or a line mode for pipes and scripts.

    In a terminal this opens the full-screen chat: rooms and conversations on the
    left, members below them, the status line above the input. Type /help inside.
    When stdin or stdout is not a terminal, or with --plain, each input line is
    sent (slash commands work: /join, /msg NAME TEXT, /switch...) and each event
    is printed as one line.

    \b
    Examples:
      zchat talk --name carol
      zchat talk -n carol --room general --room dev
      echo "deploy done" | zchat talk -n ci --room ops
      zchat talk -n dave --plain < script.txt
    """
    s = settings(config_path, broker=broker, name=name)
    rooms = _rooms(room_values)
    if not s.name and sys.stdin.isatty() and not plain:
        s.name = _prompt_name()
    me = require_name(s)
    line_mode = plain or not (sys.stdin.isatty() and sys.stdout.isatty())
    if not line_mode:
        _ask_once_about_a_new_broker(s.broker)
    if line_mode:
        _line_mode(s.broker, me, rooms, history or 0)
    else:
        _full_screen(s, me, rooms, DEFAULT_HISTORY if history is None else history)


def _ask_once_about_a_new_broker(broker: str) -> None:
    """Before the screen takes over: trust on first use, asked once (then pinned)."""
    import zmq.asyncio

    from zchat import keys

    async def ask() -> bool:
        ctx = zmq.asyncio.Context()
        try:
            ok = True
            for address in broker.split(","):  # several brokers of one set: each has its own key
                ok = await keys.ask_to_pin(address.strip(), ctx, lambda q: click.confirm(q, default=False)) and ok
            return ok
        finally:
            ctx.destroy(linger=0)

    try:
        asyncio.run(ask())
    except ValueError as exc:  # a bad address: the client says so
        raise click.UsageError(str(exc)) from None


def _line_mode(broker: str, name: str, rooms: list[str], history: int) -> None:
    from zchat.client import Client
    from zchat.logs import setup_logging
    from zchat.tui.linemode import run_line_mode

    setup_logging("WARNING", "text")

    async def body(client: Client) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_line_mode(client, rooms, history, stop)

    sys.exit(run_client(broker, name, body))


def _full_screen(s: Settings, name: str, rooms: list[str], history: int) -> None:
    from zchat.client import ClientError
    from zchat.tui.app import ChatApp
    from zchat.tui.notify import NotifySettings

    notify = NotifySettings(bell=s.talk_bell, desktop=s.talk_desktop, method=s.talk_notify)
    try:
        app = ChatApp(s.broker, name, rooms, history=history, data_dir=data_dir() if s.talk_remember else None, notify=notify)
    except (ValueError, ClientError) as exc:  # a bad broker address or name
        raise click.UsageError(str(exc)) from None
    app.run()
    if app.fatal:
        fail(EXIT_REFUSED if app.fatal_code == "refused" else EXIT_UNREACHABLE, app.fatal)


COMMANDS = [talk]
