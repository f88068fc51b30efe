"""The ``zchat`` command: a thin click layer over the broker and ``zchat.client``."""

from __future__ import annotations

import click

from zchat import __version__
from zchat.cli import (
    admin_cmd,
    backup_cmd,
    bench_cmd,
    bot_cmd,
    broker_cmd,
    chat_cmds,
    config_cmd,
    irc_cmd,
    keys_cmd,
    room_cmd,
    status_cmd,
    talk_cmd,
    web_cmd,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zchat")
def main() -> None:
    """zchat: a multi-user chat on ZeroMQ.

    \b
    Examples:
      zchat broker                      # run the broker (SQLite history)
      zchat talk --name carol           # full-screen chat
      zchat send --name bot --room general "hello"
      zchat tail --name bot --room general --json
    """


for module in (broker_cmd, chat_cmds, status_cmd, config_cmd, bot_cmd, talk_cmd, bench_cmd, backup_cmd, keys_cmd, admin_cmd, irc_cmd, room_cmd, web_cmd):
    for command in module.COMMANDS:
        main.add_command(command)
