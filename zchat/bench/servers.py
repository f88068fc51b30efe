"""The systems under test, server side: each runs as its own process, started and torn
down by PID.

- zchat: ``zchat.broker.serve`` (the same code ``zchat broker`` runs) on a fresh SQLite file;
  zchat-plain is the same broker in its test-only plaintext mode, zchat-io2 the same
  with two libzmq I/O threads (``zchat bench --encryption`` runs the three side by side).
- zmq-proxy: libzmq's own forwarder, ``zmq.proxy(PULL, PUB)`` in C.
- py-forwarder: ``recv_multipart`` then ``send_multipart``, nothing else.
- redis: Debian's ``redis-server`` on loopback, no persistence.
- threaded: the classic thread-per-client chat server (see ``threaded_server``).

The ZeroMQ peers get the same high-water marks as the zchat broker and client
(100,000 on PULL, PUB and SUB), so the comparison is about the work done per message,
not about queue sizes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

from zchat.bench import procs

HWM = 100_000


@dataclasses.dataclass
class Server:
    system: str
    proc: Any = None
    endpoints: dict[str, Any] = dataclasses.field(default_factory=dict)
    tmp: Path | None = None

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def stop(self) -> None:
        procs.stop(self.proc, grace=5.0)
        self.proc = None


# ------------------------------------------------------------------ zchat


#: Bench-only switch: ZCHAT_BENCH_PLAINTEXT=1 runs the zchat broker in its test-only
#: plaintext mode (PLAIN, no encryption), to measure what CURVE costs against the same run.
PLAINTEXT_ENV = "ZCHAT_BENCH_PLAINTEXT"


def bench_plaintext() -> bool:
    import os

    return os.environ.get(PLAINTEXT_ENV) == "1"


def _zchat_broker(
    bind: str, db: str, heartbeat: float, seed: Callable[[str], Any] | None, key_dir: str = "", plaintext: bool = False,
    io_threads: int = 1,
) -> None:
    import asyncio
    import logging

    from zchat.broker import serve
    from zchat.core import Limits
    from zchat.guard import GuardConfig
    from zchat.storage.sqlite import SqliteStorage

    logging.basicConfig(level=logging.WARNING, format="broker: %(levelname)s %(message)s")
    procs.raise_nofile()
    if seed is not None:
        asyncio.run(seed(db))
    # rate=0: no per-user rate limit, so the benchmark measures the broker, not the limiter;
    # every benchmark client comes from 127.0.0.1, so no per-address caps either.
    edge = GuardConfig(max_per_address=1_000_000, claims_per_minute=0)
    security: dict[str, Any] = dict(insecure_plaintext=True) if plaintext else dict(key_dir=key_dir)
    if io_threads != 1:
        security["io_threads"] = io_threads
    asyncio.run(serve(bind, SqliteStorage(db), Limits(heartbeat=heartbeat, rate=0), edge, **security))


def start_zchat(
    tmp: Path, heartbeat: float, seed: Callable[[str], Any] | None = None, db: Path | None = None, system: str = "zchat",
) -> Server:
    """``system``: zchat (CURVE, or plaintext with ZCHAT_BENCH_PLAINTEXT=1), zchat-plain or zchat-io2."""
    from zchat import keys

    port = procs.free_port_base(4)
    bind = f"tcp://127.0.0.1:{port}"
    db = db or tmp / "history.db"
    plaintext = system == "zchat-plain" or (system == "zchat" and bench_plaintext())
    io_threads = 2 if system == "zchat-io2" else 1
    if plaintext:  # clients (spawned later) speak PLAIN to this endpoint only
        keys.declare_insecure(bind)
        address = bind
    else:  # the key is made here and reused by the broker: clients get the keyed address
        address = keys.keyed_address(bind, keys.broker_keypair(tmp / "keys")[0])
    proc = procs.spawn(
        _zchat_broker, bind, str(db), heartbeat, seed, str(tmp / "keys"), plaintext, io_threads,
        log=str(tmp / "broker.log"), name="zchat-broker",
    )
    server = Server(system, proc, {"broker": address, "port": port}, tmp)
    try:
        procs.wait_listening(port + 2, proc, timeout=120.0)
    except Exception:
        server.stop()
        raise
    return server


# ------------------------------------------------------------------ ZeroMQ forwarders


def _zmq_proxy(pull_port: int, pub_port: int) -> None:
    import zmq

    procs.raise_nofile()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.rcvhwm = HWM
    pull.bind(f"tcp://127.0.0.1:{pull_port}")
    pub = ctx.socket(zmq.PUB)
    pub.sndhwm = HWM
    pub.bind(f"tcp://127.0.0.1:{pub_port}")
    zmq.proxy(pull, pub)


def _py_forwarder(pull_port: int, pub_port: int) -> None:
    import zmq

    procs.raise_nofile()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.rcvhwm = HWM
    pull.bind(f"tcp://127.0.0.1:{pull_port}")
    pub = ctx.socket(zmq.PUB)
    pub.sndhwm = HWM
    pub.bind(f"tcp://127.0.0.1:{pub_port}")
    recv, send = pull.recv_multipart, pub.send_multipart
    while True:
        send(recv())


def start_forwarder(system: str, tmp: Path) -> Server:
    port = procs.free_port_base(2)
    target = _zmq_proxy if system == "zmq-proxy" else _py_forwarder
    proc = procs.spawn(target, port, port + 1, log=str(tmp / "server.log"), name=system)
    server = Server(system, proc, {"pull": f"tcp://127.0.0.1:{port}", "pub": f"tcp://127.0.0.1:{port + 1}"}, tmp)
    try:
        procs.wait_listening(port + 1, proc)
    except Exception:
        server.stop()
        raise
    return server


# ------------------------------------------------------------------ Redis


def redis_available() -> str | None:
    """Why Redis cannot be measured here, or None when it can."""
    if shutil.which("redis-server") is None:
        return "redis-server not installed (apt-get install -y redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py not installed (pip install redis hiredis)"
    return None


def start_redis(tmp: Path) -> Server:
    port = procs.free_port_base(1)
    cmd = [
        shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", str(port),
        "--save", "", "--appendonly", "no", "--maxclients", "15000", "--dir", str(tmp),
        "--logfile", str(tmp / "redis.log"),
    ]
    procs.raise_nofile()
    proc = procs.popen(cmd, stdout=open(os.devnull, "wb"), stderr=open(tmp / "redis.err", "wb"))
    server = Server("redis", proc, {"host": "127.0.0.1", "port": port}, tmp)
    try:
        procs.wait_listening(port, proc)
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
    except Exception:
        server.stop()
        raise
    return server


# ------------------------------------------------------------------ the classic threaded chat


def threaded_server(port: int, ready: Any = None) -> None:
    """The classic chat server, as zchat's users knew it (docs: threaded-chat reference).

    A thread per client, every client socket in one global list (never removed), the
    first recv as the name, then each recv(1024) decoded and sendall'd to every other
    socket from the sender's own thread. No framing, no locks, no history: a client that
    stops reading blocks every sender once its socket buffer is full.
    """
    import socket
    import threading

    clients = []

    def handle(conn: socket.socket) -> None:
        name = conn.recv(1024).decode()
        print(f"{name} joined")
        while True:
            data = conn.recv(1024)
            if not data:
                break
            text = data.decode()
            for other in clients:
                if other is not conn:
                    other.sendall(text.encode())
        print(f"{name} left")

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("localhost", port))
    server.listen(5)
    if ready is not None:
        ready.set()
    while True:
        conn, _ = server.accept()
        clients.append(conn)
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _threaded_main(port: int, ready: Any) -> None:
    procs.raise_nofile()
    threaded_server(port, ready)


def start_threaded(tmp: Path) -> Server:
    port = procs.free_port_base(1)
    ready = procs.mp().Event()
    proc = procs.spawn(_threaded_main, port, ready, log=str(tmp / "server.log"), name="threaded-chat")
    server = Server("threaded", proc, {"host": "127.0.0.1", "port": port}, tmp)
    # Not a connect probe: this server keeps every socket forever and a closed one would
    # break the first sender that reaches it (that is the design being measured).
    if not ready.wait(20):
        server.stop()
        raise RuntimeError("threaded chat server did not start")
    return server


def start(system: str, tmp: Path, heartbeat: float, seed: Callable[[str], Any] | None = None, db: Path | None = None) -> Server:
    tmp.mkdir(parents=True, exist_ok=True)
    if system.startswith("zchat"):
        return start_zchat(tmp, heartbeat, seed, db, system)
    if system in ("zmq-proxy", "py-forwarder"):
        return start_forwarder(system, tmp)
    if system == "redis":
        return start_redis(tmp)
    if system == "threaded":
        return start_threaded(tmp)
    raise ValueError(system)


def send_signal(server: Server, sig: int = signal.SIGTERM) -> None:
    try:
        os.kill(server.pid, sig)
    except ProcessLookupError:
        pass


