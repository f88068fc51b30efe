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

    With --abuse, run the abuse benchmark instead: hostile clients against fresh
    brokers and what they cost a normal user (`zchat bench --abuse --help`).

    \b
    Examples:
      zchat bench --quick                 # under 2 minutes
      zchat bench --out results/today     # full run, under 15 minutes
      zchat bench --scenarios fanout latency --systems zchat zmq-proxy
      zchat bench --abuse --quick         # every attack, 3 s each
      zchat bench --gateway --quick       # 100 web users beside 100 direct clients
      zchat bench --rooms --members 1000  # a membership change in a private room
    """
    rest = list(args)
    if "--rooms" in rest:  # a private room's membership change (zchat/bench/rooms.py)
        from zchat.bench.rooms import main as rooms

        rest.remove("--rooms")
        sys.exit(rooms(rest))
    if "--abuse" in rest:
        from zchat.bench.abuse import main as abuse

        rest.remove("--abuse")
        sys.exit(abuse(rest))
    if "--gateway" in rest:  # 500 WebSocket users through `zchat web` beside 500 direct clients
        from zchat.bench.gateway import main as gateway

        rest.remove("--gateway")
        sys.exit(gateway(rest))
    from zchat.bench.runner import main

    sys.exit(main(rest))


COMMANDS = [bench]
