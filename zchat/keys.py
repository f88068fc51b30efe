"""CURVE keys: the broker's keypair, users' identity keys, keyed addresses, pinning.

Keys are Z85 text (40 characters for 32 bytes), as ZeroMQ takes them.

* The broker's keypair lives in its data directory (``broker.key``, mode 0600, the
  public key on its first line and the secret on its second), made on first start.
* A user's identity for a name is a CURVE keypair derived from the per-name secret
  that zchat.config keeps in ``CONFIG_DIR/secrets/NAME`` (mode 0600, made on first
  use): name and secret are hashed into a Curve25519 secret key, whose public key ZeroMQ
  computes. Copying that file copies the identity; a PLAIN-era secret becomes a key
  with no new file (see docs/protocol.md "Keys and names").
* A keyed address is ``tcp://HOST:PORT#k=<z85 public key>``: the part after ``#`` is
  never sent anywhere, the client uses it as the broker's key.
* ``CONFIG_DIR/known_brokers`` pins brokers' keys (trust on first use), one
  ``tcp://HOST:PORT <z85 key>`` a line.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import secrets
from pathlib import Path
from typing import Callable

import zmq
import zmq.asyncio
from zmq.utils import z85

log = logging.getLogger(__name__)

KEY_FILE = "broker.key"
KEYS_PORT_OFFSET = 3  # the broker's plain "what is your key" endpoint: port P+3
KEY_REQUEST = b"zchat-key?"
KEY_REPLY_PREFIX = b"zchat-key "
#: Endpoints of brokers in this process that were started with insecure_plaintext
#: (tests only): clients speak PLAIN to these and to nothing else. Such a broker also
#: names its endpoint in the environment variable below, so that client subprocesses
#: of a test find it; both say so loudly.
INSECURE_ENDPOINTS: set[str] = set()
INSECURE_ENV = "ZCHAT_INSECURE_PLAINTEXT_ENDPOINTS"


def declare_insecure(endpoint: str) -> None:
    """A test-only plaintext broker is up at ``endpoint``: let this process's clients
    (and its child processes') speak PLAIN to it."""
    INSECURE_ENDPOINTS.add(endpoint)
    names = [e for e in os.environ.get(INSECURE_ENV, "").split(",") if e]
    if endpoint not in names:
        os.environ[INSECURE_ENV] = ",".join(names + [endpoint])


def undeclare_insecure(endpoint: str) -> None:
    """The plaintext broker at ``endpoint`` has stopped. Its declaration must not outlive
    it: a CURVE broker started on that port later (test brokers share 12,000 ports) would
    be spoken to in PLAIN by this process's new clients, and never answer them."""
    INSECURE_ENDPOINTS.discard(endpoint)
    names = [e for e in os.environ.get(INSECURE_ENV, "").split(",") if e and e != endpoint]
    if names:
        os.environ[INSECURE_ENV] = ",".join(names)
    else:
        os.environ.pop(INSECURE_ENV, None)


def is_insecure(endpoint: str) -> bool:
    if endpoint in INSECURE_ENDPOINTS or endpoint in os.environ.get(INSECURE_ENV, "").split(","):
        log.info("INSECURE: speaking PLAIN without encryption to the test-only plaintext broker %s", endpoint)
        return True
    return False


class KeyError_(Exception):
    """A key could not be had or does not match: ``str()`` says what happened and how to fix it."""


def require_curve() -> None:
    """Fail clearly when libzmq was built without CURVE (pyzmq's wheels carry it)."""
    if not zmq.has("curve"):
        raise KeyError_(
            f"this libzmq ({zmq.zmq_version()}) has no CURVE support: install pyzmq from its wheels "
            "(pip install --force-reinstall pyzmq), which bundle libsodium"
        )


def valid_key(key: str | bytes) -> bool:
    text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
    if len(text) != 40:
        return False
    try:
        z85.decode(text)
    except Exception:
        return False
    return True


def fingerprint(public: str | bytes) -> str:
    """A short, readable digest of a public key (SHA-256, 16 hex digits in fours)."""
    raw = z85.decode(public if isinstance(public, bytes) else public.encode())
    h = hashlib.sha256(raw).hexdigest()[:16]
    return ":".join(h[i : i + 4] for i in range(0, 16, 4))


def keypair_from_secret(secret: str, name: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys for ``name``'s secret (deterministic; one key per name,
    even where one secret is used for several names)."""
    seed = hashlib.sha256(b"zchat-curve-key:" + name.encode() + b":" + secret.encode()).digest()
    secret_key = z85.encode(seed)
    return zmq.curve_public(secret_key), secret_key


def throwaway_keypair() -> tuple[bytes, bytes]:
    """A fresh keypair, for a look-only session that owns nothing."""
    return zmq.curve_keypair()


def broker_keypair(directory: Path) -> tuple[bytes, bytes]:
    """The broker's keypair in ``directory``; made on first start (mode 0600), then reused."""
    path = directory / KEY_FILE
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        public, secret = zmq.curve_keypair()
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(public.decode() + "\n" + secret.decode() + "\n")
        try:
            os.link(tmp, path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        log.info("made a new broker keypair in %s", path)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    lines = path.read_text().split()
    if len(lines) != 2 or not all(valid_key(k) for k in lines):
        raise KeyError_(f"broker key file {path} is damaged: restore it from a backup (or delete it to make a new key, which every client will then refuse until re-pinned)")
    public, secret = lines[0].encode(), lines[1].encode()
    if zmq.curve_public(secret) != public:
        raise KeyError_(f"broker key file {path}: its public key does not match its secret key")
    return public, secret


# ------------------------------------------------------------------ addresses


def split_address(address: str) -> tuple[str, str | None]:
    """``tcp://h:p#k=KEY`` -> (``tcp://h:p``, KEY); no ``#k=`` -> (address, None)."""
    endpoint, sep, fragment = address.partition("#")
    if not sep:
        return address, None
    if not fragment.startswith("k="):
        raise ValueError(f"bad broker address {address!r}: after '#' expected k=<40-character key>")
    key = fragment[2:]
    if not valid_key(key):
        raise ValueError(f"bad broker key in {address!r}: expected 40 Z85 characters, got {len(key)}")
    return endpoint, key


def keyed_address(endpoint: str, public: str | bytes) -> str:
    key = public.decode() if isinstance(public, bytes) else public
    return f"{endpoint}#k={key}"


def is_loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------ known brokers


def known_brokers_path() -> Path:
    from zchat.config import config_dir

    return config_dir() / "known_brokers"


def pinned(endpoint: str, path: Path | None = None) -> str | None:
    """The key pinned for ``endpoint`` (None: never seen)."""
    path = path or known_brokers_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == endpoint:
            return parts[1]
    return None


def pin(endpoint: str, key: str, path: Path | None = None) -> None:
    """Pin ``key`` for ``endpoint`` (replacing an older pin of it), atomically."""
    path = path or known_brokers_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.split()[:1] != [endpoint]]
    except FileNotFoundError:
        lines = []
    lines.append(f"{endpoint} {key}")
    tmp = path.with_name(f".known_brokers.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def keys_endpoint(endpoint: str) -> str:
    base, _, port = endpoint.rpartition(":")
    return f"{base}:{int(port) + KEYS_PORT_OFFSET}"


async def fetch_key(endpoint: str, ctx: zmq.asyncio.Context, timeout: float = 2.0, attempt: float = 2.0) -> str | None:
    """Ask the broker's plain key endpoint (port P+3) for its public key; None on silence.

    Asked again on a fresh socket every ``attempt`` seconds until ``timeout``: a request
    written to a connection the broker then cut (its guard frees descriptors by cutting
    the oldest unfinished handshakes) is never answered, and a DEALER does not resend it.
    Unauthenticated by nature: the answer is only trusted when pinned on first use,
    or checked against a pin or a keyed address.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        key = await _ask_key(endpoint, ctx, max(0.05, min(attempt, left)))
        if key is not None or left <= attempt:
            return key


async def _ask_key(endpoint: str, ctx: zmq.asyncio.Context, timeout: float) -> str | None:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.maxmsgsize = 256
    try:
        sock.connect(keys_endpoint(endpoint))
        await sock.send(KEY_REQUEST)
        try:
            reply = await asyncio.wait_for(sock.recv(), timeout)
        except asyncio.TimeoutError:
            return None
    finally:
        sock.close(linger=0)
    if not reply.startswith(KEY_REPLY_PREFIX):
        return None
    key = reply[len(KEY_REPLY_PREFIX):].decode("ascii", "replace")
    return key if valid_key(key) else None


async def broker_key(address: str, ctx: zmq.asyncio.Context, trust_new: bool = False, timeout: float = 2.0) -> tuple[str, str]:
    """(endpoint, key) to use for ``address``: from the address, or from the pin.

    An unknown broker is pinned on first use if it is on loopback or ``trust_new``;
    otherwise, and whenever the broker presents a key other than the one pinned, this
    raises KeyError_ before anything but the plain key request is sent.
    """
    endpoint, given = split_address(address)
    known = pinned(endpoint)
    if given is not None:
        if known is None:
            pin(endpoint, given)
        elif known != given:
            log.warning("the key in the address for %s differs from the pinned one; using and pinning the address's", endpoint)
            pin(endpoint, given)
        return endpoint, given
    # Pinned: the answer only checks the pin (CURVE fails against an impostor anyway), so
    # a silent endpoint is not waited for long; unknown: the answer is the key itself.
    presented = await fetch_key(endpoint, ctx, timeout if known is None else min(timeout, 2.0))
    if known is not None:
        if presented is not None and presented != known:
            raise KeyError_(
                f"the broker at {endpoint} presents key {fingerprint(presented)}, but {fingerprint(known)} is pinned "
                f"for it in {known_brokers_path()}: refusing to connect (someone may be impersonating it). If the "
                f"broker's key was changed on purpose, connect once with the new key in the address "
                f"({endpoint}#k=<key from `zchat broker --show-address`>) or delete its line in that file"
            )
        return endpoint, known
    if presented is None:
        raise KeyError_(f"no answer from the broker's key endpoint {keys_endpoint(endpoint)}: give its key in the address ({endpoint}#k=<key>)")
    if not (trust_new or is_loopback(endpoint)):
        raise KeyError_(
            f"the broker at {endpoint} is not known yet (key fingerprint {fingerprint(presented)}). Check that fingerprint "
            f"with its operator, then use the address with the key ({endpoint}#k={presented}) or --trust-new-broker"
        )
    pin(endpoint, presented)
    # On loopback pinning needs no question (documented); trusting a remote broker is worth a warning.
    log.log(logging.INFO if is_loopback(endpoint) else logging.WARNING, "pinned the new broker %s, key fingerprint %s, in %s",
            endpoint, fingerprint(presented), known_brokers_path())
    return endpoint, presented


async def ask_to_pin(
    address: str, ctx: zmq.asyncio.Context, confirm: Callable[[str], bool], *, loopback_trusted: bool = True,
) -> bool:
    """For an interactive client: if ``address`` names a broker with no key in it, not
    pinned yet and not trusted without asking (loopback), fetch its key, show its
    fingerprint through ``confirm`` and pin it if the user says yes. True when there is
    nothing left to ask (pinned now, already known, keyed, or trusted); False if the user
    said no or the broker did not answer (the connection then fails with the usual
    explanation). Asked once: the pin answers every later run."""
    endpoint, given = split_address(address)
    if given is not None or pinned(endpoint) is not None or (loopback_trusted and is_loopback(endpoint)):
        return True
    presented = await fetch_key(endpoint, ctx)
    if presented is None:
        return False
    question = (
        f"The broker at {endpoint} is not known yet. Its key fingerprint is {fingerprint(presented)}.\n"
        f"Check it with the broker's operator (zchat broker --show-address). Trust it and remember it?"
    )
    if not confirm(question):
        return False
    pin(endpoint, presented)
    log.info("pinned the new broker %s, key fingerprint %s, in %s", endpoint, fingerprint(presented), known_brokers_path())
    return True
