"""``zchat bench``: the benchmark against libzmq, a Python forwarder, Redis and a threaded chat."""

from __future__ import annotations

import sys

import click


@click.command(
    "bench",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Measure zchat side by side with its peers (run `zchat bench --help` for options).

    \b
    Examples:
      zchat bench --quick                 # under 2 minutes
      zchat bench --out results/today     # full run, under 15 minutes
      zchat bench --scenarios fanout latency --systems zchat zmq-proxy
    """
    from zchat.bench.runner import main

    sys.exit(main(list(args)))


COMMANDS = [bench]
