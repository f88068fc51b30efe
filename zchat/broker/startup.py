"""Starting a broker: storage opened and loaded, the keypair, every socket bound with
the guard's bounds, the core made from what storage holds, and the key port."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from typing import Any

import zmq
from zmq.utils import z85

from zchat import __version__, auth, keys
from zchat import protocol as p
from zchat.broker.constants import (
    BATCH,
    MAX_PUBLICATION_BYTES,
    ZAP_DOMAIN,
    ZAP_ENDPOINT,
)
from zchat.broker.engines import engine_for
from zchat.core import Core, Limits
from zchat.guard import ConnectionGuard, connection_cap, raise_fd_limit

log = logging.getLogger(__package__)  # one logger for the whole broker: "zchat.broker"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (``tcp://host``, port); port 0 means pick free ports."""
    base, _, port = endpoint.rpartition(":")
    if not endpoint.startswith("tcp://") or not port.isdigit():
        raise ValueError(f"endpoint must look like tcp://HOST:PORT, got {endpoint!r}")
    return base, int(port)


class Startup:
    """Broker start-up (a mixin of Broker): _start binds and loads, _serve_key answers
    the broker's public key on its own plain port."""

    async def _start(self) -> None:
        epoch = await self.storage.open()
        heads = await self.storage.heads()
        members = await self.storage.members()
        users = await self.storage.users()
        recent = await self.storage.recent(10_000)
        rooms_state = await self.storage.rooms_state()
        soft, _hard = raise_fd_limit()
        g = self.guard_config
        if self.insecure_plaintext:
            log.error("!!! INSECURE PLAINTEXT MODE (tests only): names' secrets and every message cross the network in clear !!!")
            mech: dict[str, Any] = dict(plain_server=1)
        else:
            keys.require_curve()
            if self.key_dir is not None:
                public, secret_key = keys.broker_keypair(__import__("pathlib").Path(self.key_dir))
            else:
                public, secret_key = zmq.curve_keypair()
                log.warning("no key directory: this broker's keypair lasts for this run only")
            self.public_key = public
            mech = dict(curve_server=1, curve_secretkey=secret_key)
            for name in users:
                stored = await self.storage.get_user(name)
                for key in auth.owner_keys(stored):
                    self.key_names[key] = name
                    self.name_keys.setdefault(name, []).append(key)
            self.revoked = await self.storage.revoked_keys()  # refused at ZAP, also after a restart
        # Everything that imports a module or opens a file comes before the first bind:
        # from then on a flood of connections can take every descriptor (the guard cuts
        # the excess, but only after libzmq accepted it), and an import then fails.
        self.engine = engine_for(self.storage, self._poke)
        self.guard = ConnectionGuard(self.ctx, g, connection_cap(g, soft))
        self.zap = self._socket(zmq.REP)
        self.zap.bind(ZAP_ENDPOINT)
        # The socket limit is twice the body limit: a body a little too big gets a clear
        # too_large error; a frame beyond twice the limit costs its sender the connection.
        maxmsgsize = 2 * self.limits.max_bytes
        rcvhwm = g.rcvhwm(maxmsgsize)
        # A handshake must finish within handshake_timeout. Dead hosts are found by TCP
        # keepalive (idle 60 s, then 6 probes 10 s apart), not by ZMTP heartbeats: in
        # libzmq 4.3.5 the heartbeat timer calls out_event() on an engine that has already
        # met an I/O error (stream_engine_base.cpp timer_event), which aborts the whole
        # broker on "Assertion failed: !_io_error"; a flood that fills a connection's
        # receive queue made that happen (twice in six 10 s runs of the stalled-subscriber
        # attack). A client whose connection went silent starts over with a new session
        # id (the old pipe's routing id stays held until TCP gives up, and takes nothing).
        secure = dict(
            zap_domain=ZAP_DOMAIN, maxmsgsize=maxmsgsize, rcvhwm=rcvhwm, **mech,
            handshake_ivl=max(100, int(g.handshake_timeout * 1000)),
            tcp_keepalive=1, tcp_keepalive_idle=60, tcp_keepalive_intvl=10, tcp_keepalive_cnt=6,
        )
        # No router_handover: a connection that presents a routing id already in use is
        # ignored by libzmq rather than given that session's route (a takeover).
        self.router = self._socket(zmq.ROUTER, router_handover=0, sndhwm=g.router_sndhwm(), **secure)
        self.pull = self._socket(zmq.PULL, **secure)
        self.xpub = self._socket(zmq.XPUB, xpub_manual=1, sndhwm=g.xpub_sndhwm(self.limits.pub_hwm, MAX_PUBLICATION_BYTES), **secure)
        watched = [("requests", self.router), ("chat", self.pull), ("fan-out", self.xpub)]
        if not self.insecure_plaintext:
            # Plain on purpose: a client asks for the key before it can speak CURVE. It
            # answers 40 public characters to a 10-byte question; queues of 16 tiny frames.
            self.keysock = self._socket(
                zmq.ROUTER, maxmsgsize=64, rcvhwm=16, sndhwm=16, router_mandatory=0,
                handshake_ivl=max(100, int(g.handshake_timeout * 1000)),
            )
            watched.append(("keys", self.keysock))
        for label, sock in watched:
            self.guard.watch(label, sock)
        self.guard.start()
        log.info(
            "edge: %d connections from one address a port, %d in all; queues: rcvhwm %d (%d KiB a connection), "
            "ROUTER sndhwm %d, XPUB sndhwm %d; %d new names an address a minute; reserved %s",
            g.max_per_address, self.guard.total_cap, rcvhwm, rcvhwm * maxmsgsize // 1024, g.router_sndhwm(),
            g.xpub_sndhwm(self.limits.pub_hwm, MAX_PUBLICATION_BYTES), g.claims_per_minute, ",".join(sorted(self.reserved)) or "none",
        )
        if g.max_refusals > 0:
            log.info(
                "a user ignoring retry_after %d times in %.0fs (an address refused %d handshakes) is cut for %.0fs",
                g.max_refusals, g.refusal_window, max(1, g.max_refusals // 10), g.cooloff,
            )
        else:
            log.info("no cut for peers that ignore retry_after (max-refusals 0)")
        base, port = split_endpoint(self.bind)
        ports = []
        for offset, sock in enumerate((self.router, self.pull, self.xpub)):
            if port:
                sock.bind(f"{base}:{port + offset}")
                ports.append(port + offset)
            else:
                sock.bind(f"{base}:*")
                ports.append(int(sock.last_endpoint.decode().rpartition(":")[2]))
        self.ports = (ports[0], ports[1], ports[2])
        self.endpoint = f"{base}:{ports[0]}"
        if self.insecure_plaintext:
            keys.declare_insecure(self.endpoint)
            self.address = self.endpoint
        else:  # a CURVE broker holds this endpoint now: no stale plaintext declaration may outlive it
            keys.undeclare_insecure(self.endpoint)
            self.keys_port = self._serve_key(base, port + keys.KEYS_PORT_OFFSET if port else 0)
            self.address = keys.keyed_address(self.endpoint, self.public_key)
            log.info("broker key %s (fingerprint %s); give users the address %s", self.public_key.decode(), keys.fingerprint(self.public_key), self.address)
            log.info("registration: %s; admins: %s", self.registration, ",".join(self.admins) or "none")
        limits = Limits(**{**self.limits.__dict__, "pull_port": ports[1], "pub_port": ports[2]})
        self.core = Core(
            epoch=epoch, boot=secrets.token_hex(6), limits=limits, heads=heads, members=members, users=users,
            recent=recent, id_prefix=secrets.token_hex(4) + "-", wall_offset=time.time() - time.monotonic(),
            rooms_state=rooms_state, new_token=lambda: secrets.token_hex(8), admins=self._admin_names(),
        )
        await self.engine.start(self.core)
        lim = self.core.limits
        log.info(
            "limits: %g lines/s per user (burst %g), %g lines/s per room, %g requests/s per user (burst %g), "
            "max_rooms %d per user, %d-byte messages",
            lim.rate, lim.burst, lim.room_rate, lim.request_rate, lim.request_burst, lim.max_rooms, lim.max_bytes,
        )
        log.info(
            "zchat %s broker up: requests %s, chat in %s:%d, fan-out %s:%d, epoch %s, pid %d",
            __version__, self.endpoint, base, ports[1], base, ports[2], epoch, os.getpid(),
        )

    def _admin_names(self) -> set[str]:
        """The admins' names: as given, and the names of the keys given (auth.is_admin)."""
        names = {entry for entry in self.admins if p.valid_name(entry)}
        for key, name in self.key_names.items():
            if z85.encode(key).decode() in self.admins:
                names.add(name)
        return names

    def _serve_key(self, base: str, port: int) -> int:
        """Bind the plain key endpoint and hand its socket to a thread that answers
        KEY_REQUEST with this broker's public key; return its port. The thread alone
        uses the socket from then on and closes it when the context is terminated."""
        sock = self.keysock
        sock.bind(f"{base}:{port}" if port else f"{base}:*")
        bound = int(sock.last_endpoint.decode().rpartition(":")[2])
        answer = keys.KEY_REPLY_PREFIX + self.public_key

        def serve() -> None:
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            try:
                while True:
                    if not poller.poll(1000):
                        continue
                    for _ in range(BATCH):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if len(frames) == 2 and frames[1] == keys.KEY_REQUEST:
                            try:
                                sock.send_multipart([frames[0], answer], zmq.NOBLOCK)
                            except zmq.ZMQError:
                                pass  # that peer does not read: its answer is dropped
            except zmq.ContextTerminated:
                pass
            except Exception:  # pragma: no cover - never take the broker down
                log.exception("the key endpoint failed; clients must get the key in the address")
            finally:
                sock.close(linger=0)

        threading.Thread(target=serve, name="zchat-key", daemon=True).start()
        self.keysock = None  # type: ignore[assignment]  # the thread's now
        return bound
