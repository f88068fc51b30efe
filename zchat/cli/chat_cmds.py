"""Scriptable client commands: send, tail, search, who, rooms, ping. Each is a few lines over
``zchat.client``; exit codes: 0 done, 1 refused by the broker, 2 bad usage, 3 no broker."""

from __future__ import annotations

import asyncio
import json
import time

import click

from zchat import protocol as p
from zchat import render
from zchat.cli.options import client_options, require_name, run_client, with_settings
from zchat.client import Client
from zchat.config import Settings
from zchat.recovery import Gap

EXIT_CODES = "Exit status: 0 done, 1 refused by the broker, 2 bad usage, 3 broker unreachable."


def _room(value: str | None) -> str | None:
    return value.lstrip("#").lower() if value else value


@click.command("send", epilog=EXIT_CODES)
@client_options
@click.option("--room", "-r", help="Room to send to (joined if needed).")
@click.option("--to", "to", help="Send a direct message to this user instead.")
@click.option("--me", is_flag=True, help="Send as an action (/me).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the broker to store it.")
@click.argument("text", nargs=-1, required=True)
@with_settings
def send(s: Settings, room: str | None, to: str | None, me: bool, timeout: float, text: tuple[str, ...]) -> None:
    """Send TEXT; exit 0 once the broker has stored it.

    \b
    Examples:
      zchat send --name bot --room general "build passed"
      zchat send --name carol --to dave "lunch?"
      echo "deploy done" | xargs -0 zchat send -n ci -r ops
    """
    name = require_name(s)
    room, message = _room(room), " ".join(text)
    if bool(room) == bool(to):
        raise click.UsageError("give exactly one of --room and --to")

    async def body(client: Client) -> p.Stored:
        if room:
            await client.join(room, receive=False)  # a member, to send; it never reads the room
            return await client.send(room, message, me=me, timeout=timeout)
        return await client.send_dm(to.lower(), message, me=me, timeout=timeout)  # type: ignore[union-attr]

    stored = run_client(s.broker, name, body)
    click.echo(f"stored {stored.room} #{stored.seq} id {stored.id}", err=True)


@click.command("tail", epilog=EXIT_CODES)
@client_options
@click.option("--room", "-r", required=True, help="Room to follow.")
@click.option("--history", type=int, default=10, show_default=True, help="Earlier messages to print first.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line (room, seq, sender, text, ts, id, kind); lost messages are a "
                   '{"kind": "gap", "room", "first", "last", "reason"} record.')
@click.option("--count", type=int, help="Exit after this many chat lines (text and /me; join and part lines are printed but not counted).")
@click.option("--timeout", type=float, help="Exit after this many seconds.")
@with_settings
def tail(s: Settings, room: str, history: int, as_json: bool, count: int | None, timeout: float | None) -> None:
    """Print a room's history, then its live messages, in order, with nothing missed.

    Messages that cannot be recovered (trimmed from history, or more than the
    recovery limit missed while away) are reported in place: a "--- ... missing"
    line, or a gap record with --json.

    \b
    Examples:
      zchat tail --name watcher --room general
      zchat tail -n bot -r general --json --history 100 --count 100 --timeout 5
      zchat tail -n bot -r ops --json | jq -r 'select(.kind=="text") | .text'
    """
    name, room = require_name(s), _room(room)
    if not 0 <= history <= p.MAX_HISTORY:
        raise click.UsageError(f"--history must be 0..{p.MAX_HISTORY}")

    async def body(client: Client) -> None:
        await client.join(room, history=history)  # type: ignore[arg-type]
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        events = client.events()
        while count is None or seen < count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            try:
                event = await asyncio.wait_for(anext(events), left)
            except (asyncio.TimeoutError, StopAsyncIteration):
                return
            if isinstance(event, p.Msg) and event.room == room:
                if event.kind in ("text", "me"):
                    seen += 1
                click.echo(json.dumps(render.as_json(event), ensure_ascii=False) if as_json else render.line(event, name))
            elif isinstance(event, Gap) and event.room == room:
                click.echo(json.dumps(render.gap_json(event), ensure_ascii=False) if as_json else render.line(event, name))
            elif not as_json and (text := render.line(event, name)) is not None:
                click.echo(text, err=True)

    run_client(s.broker, name, body)


@click.command("search", epilog=EXIT_CODES)
@client_options
@click.option("--room", "-r", help="Search this room only (@NAME: your conversation with NAME). [default: every room you may read]")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, help="Most lines to print.")
@click.option("--before", type=click.IntRange(min=0), default=0, help="Go on from an earlier search: the 'before' its --json 'more' record gave.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line, newest first (the shape of tail --json); then "
                   '{"kind": "more", "before": N} when more may match.')
@click.argument("text", nargs=-1, required=True)
@with_settings
def search(s: Settings, room: str | None, limit: int, before: int, as_json: bool, text: tuple[str, ...]) -> None:
    """Find lines holding every word of TEXT (WORD* matches a prefix), newest first,
    in the rooms you may read: public rooms, private rooms you are in, your direct
    conversations. Without --name, public rooms only (a look-only session).

    \b
    Examples:
      zchat search --name carol deploy failed
      zchat search -n carol --room ops "dep*" --json | jq -r .text
    """
    words = " ".join(text)
    where = _room(room) or ""
    if where.startswith("@"):
        where = p.dm_room(require_name(s), where[1:])

    async def body(client: Client) -> tuple[list[p.Msg], int]:
        return await client.search(words, room=where, limit=limit, before=before)

    hits, more = run_client(s.broker, s.name or None, body)
    for msg in hits:
        if as_json:
            click.echo(json.dumps(render.as_json(msg), ensure_ascii=False))
        else:
            click.echo(f"{time.strftime('%Y-%m-%d', time.localtime(msg.ts))} {render.line(msg, s.name)}")
    if more:
        if as_json:
            click.echo(json.dumps({"kind": "more", "before": more}))
        else:
            click.echo(f"(more may match: add --before {more})", err=True)
    elif not hits and not as_json:
        click.echo("nothing found", err=True)


@click.command("who", epilog=EXIT_CODES)
@client_options
@click.option("--room", "-r", required=True, help="Room to list.")
@click.option("--json", "as_json", is_flag=True)
@with_settings
def who(s: Settings, room: str, as_json: bool) -> None:
    """List a room's members and whether they are online (without --name, as a
    look-only session that claims no name).

    \b
    Example:
      zchat who --room general
    """
    members = run_client(s.broker, s.name, lambda c: c.who(_room(room)))  # type: ignore[arg-type]
    for m in members:
        click.echo(json.dumps({"name": m.name, "online": m.online}) if as_json else f"{m.name}\t{'online' if m.online else 'offline'}")


@click.command("rooms", epilog=EXIT_CODES)
@client_options
@click.option("--json", "as_json", is_flag=True)
@with_settings
def rooms(s: Settings, as_json: bool) -> None:
    """List rooms with their member and online counts (without --name, as a
    look-only session that claims no name).

    \b
    Example:
      zchat rooms --broker tcp://chat.example:5555
    """
    for r in run_client(s.broker, s.name, lambda c: c.rooms()):
        if as_json:
            click.echo(json.dumps({"room": r.name, "members": r.members, "online": r.online}))
        else:
            click.echo(f"#{r.name}\t{render.counted(r.members, 'member')}\t{r.online} online")


@click.command("ping", epilog=EXIT_CODES)
@client_options
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for an answer.")
@with_settings
def ping(s: Settings, timeout: float) -> None:
    """Check that the broker answers; exit 0 if it does (without --name, as a
    look-only session that claims no name).

    \b
    Examples:
      zchat ping
      zchat ping --broker tcp://broker:5555 --timeout 2   # a container healthcheck
    """
    rtt = run_client(s.broker, s.name, lambda c: c.ping(timeout), timeout=timeout)
    click.echo(f"broker {s.broker} answered in {rtt * 1000:.1f} ms")


COMMANDS = [send, tail, search, who, rooms, ping]
