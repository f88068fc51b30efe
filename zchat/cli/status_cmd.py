"""``zchat status``: what a running broker is doing, for whoever runs it."""

from __future__ import annotations

import json

import click
import msgspec

from zchat import protocol as p
from zchat.cli.chat_cmds import EXIT_CODES
from zchat.cli.options import client_options, run_client, with_settings
from zchat.config import Settings


def _bytes(n: int) -> str:
    if n < 0:
        return "unknown"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def as_text(s: p.StatusReply, broker: str) -> str:
    """The status as an operator reads it: what first, then rates, then limits."""
    rates = s.rates
    lines = [
        f"broker     {broker} (zchat {s.version}, boot {s.boot})",
        f"uptime     {_uptime(s.uptime)}",
        f"epoch      {s.epoch}",
        f"storage    {s.storage} ({_bytes(s.storage_bytes)})"
        + (f", REFUSING WRITES for {s.storage_unavailable:.0f}s (disk full or read-only?)" if s.storage_unavailable else ""),
        *([f"search     index {s.search_behind} commits behind ({_bytes(s.search_bytes)})"] if s.search_bytes >= 0 else []),
        f"sessions   {s.sessions} ({s.users_online} users online of {s.users})",
        f"rooms      {s.rooms} rooms, {s.conversations} direct conversations",
        f"messages   {s.messages}",
        "last min   " + ", ".join(f"{rates.get(k, 0.0):g}/s {label}" for k, label in (
            ("lines_received", "lines in"), ("messages_stored", "stored"),
            ("lines_refused", "refused"), ("history_requests", "history"),
        )),
        "limits     " + ", ".join(f"{k}={v}" for k, v in sorted(s.limits.items())),
    ]
    if s.counters:
        lines.append("counters   " + ", ".join(f"{k}={v}" for k, v in sorted(s.counters.items())))
    return "\n".join(lines)


@click.command("status", epilog=EXIT_CODES)
@client_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object (the broker's status reply).")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for an answer.")
@with_settings
def status(s: Settings, as_json: bool, timeout: float) -> None:
    """Show what the broker is doing: version, uptime, epoch, storage and its size,
    sessions, users online, rooms, messages, rates over the last minute and the
    limits in force (without --name, as a look-only session). `zchat ping` stays
    the liveness check.

    \b
    Examples:
      zchat status
      zchat status --broker tcp://chat.example:5555 --json | jq .rates
    """
    reply = run_client(s.broker, s.name, lambda c: c.status(timeout), timeout=timeout)
    if as_json:
        data = msgspec.to_builtins(reply)
        for key in ("k", "v", "rid"):
            data.pop(key, None)
        click.echo(json.dumps(data, sort_keys=True))
    else:
        click.echo(as_text(reply, s.broker))


COMMANDS = [status]
