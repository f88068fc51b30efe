"""zchat.sockio.close_monitored: closing a monitored socket never wedges its context.

libzmq's I/O thread sends each monitor event with a blocking send on the monitor's PAIR;
with the reader gone and the socket still emitting, that send never returns and every
socket of the context stops (in a full test run, every client after that point went
silent). Each case runs in a subprocess: a wedged context cannot even be terminated.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, sys, time, zmq
    from zchat.sockio import close_monitored
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.linger = 0
    d.reconnect_ivl = d.reconnect_ivl_max = 10
    mon = d.get_monitor_socket(zmq.EVENT_ALL, addr="inproc://close-monitored-test")
    rep = ctx.socket(zmq.REP)
    rep.linger = 0
    dead = rep.bind_to_random_port("tcp://127.0.0.1")
    rep.unbind(rep.last_endpoint)  # a port nobody listens on: connect retries, events, forever
    d.connect(f"tcp://127.0.0.1:{dead}")
    assert mon.poll(5000), "the monitor reports the retries"
    class SlowToClose:  # widens the moment between the reader's close and the socket's
        def close(self, linger=None):
            mon.close(linger=0)
            time.sleep(0.5)  # the retries go on meanwhile (10 ms apart), unless stopped
    if sys.argv[1] == "helper":
        close_monitored(d, SlowToClose())
    else:  # what the client did: the reader first, the socket alive a moment longer
        mon.close(linger=0)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # the retries go on meanwhile (10 ms apart)
            time.sleep(0.05)
        d.close(linger=0)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.connect(f"tcp://127.0.0.1:{port}")
    req.send(b"ping")
    print("answered" if rep.poll(5000) else "wedged")
    sys.stdout.flush()
    os._exit(0)
    """
)


def run(mode: str) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_closing_a_monitored_socket_leaves_its_context_working() -> None:
    assert run("helper") == "answered"


def test_the_old_order_wedges_the_context_so_the_test_above_can_fail() -> None:
    assert run("reader-first") == "wedged"
