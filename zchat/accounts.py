"""Accounts of a gateway's users (web, IRC): a name, a password hash, a zchat secret.

A gateway speaks to the broker as each of its users, so it must hold their zchat
identity: the secret from which ``zchat.keys.keypair_from_secret`` derives the CURVE
keypair that owns the name (the same secret ``zchat.config.load_secret`` gives a
terminal user). People sign in to the gateway with a password, which is kept only as
a memory-hard hash (``hashlib.scrypt``, random salt), so a stolen file does not give
the passwords away cheaply.

The store is one JSON file (``accounts.json``, mode 0600) in the gateway's data
directory, rewritten atomically (temporary file, fsync, rename) on every change, under
a lock file so that gateways in several processes (web and IRC) can share it. It is
small (a few hundred bytes an account) and changes only at account creation and
password change, so a file is simpler than a database and easy to back up.

``Accounts.verify`` says True or False only: a gateway must answer "wrong name or
password" for both an unknown name and a wrong password, so that sign-in cannot be used
to probe which names have accounts. ``Accounts.create`` may say the name is taken
(creating an account has to). ``SignInLimiter`` bounds sign-in attempts per name and
per source address with token buckets of bounded number.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from zchat import protocol as p

log = logging.getLogger(__name__)

FILE_NAME = "accounts.json"
LOCK_NAME = ".accounts.lock"
FORMAT = 1
#: scrypt cost: n=2**14, r=8, p=1 takes 16 MiB and ~50 ms a hash here; the parameters
#: are stored with each hash, so raising them later keeps old hashes verifiable.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_LEN = 32
SALT_BYTES = 16
MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # scrypt takes any length; a bound keeps one request cheap to refuse
MAX_ACCOUNTS = 100_000


class AccountError(Exception):
    """An account could not be made or changed; ``code`` is one of the class's codes and
    ``str()`` is a sentence to show."""

    BAD_NAME = "bad_name"
    BAD_PASSWORD = "bad_password"
    TAKEN = "taken"
    FULL = "full"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Account:
    """One user of the gateway. ``secret`` is the zchat identity secret: whoever holds
    it speaks as ``name`` to the broker, so it never leaves the gateway. Give it to
    ``zchat.client.Client(broker, name, secret)``, as the CLI gives a terminal user's."""

    name: str
    secret: str
    created: float

    def keypair(self) -> tuple[bytes, bytes]:
        """The CURVE (public, secret) keys the broker knows this user by."""
        from zchat.keys import keypair_from_secret

        return keypair_from_secret(self.secret, self.name)


def _hash(password: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p_: int = SCRYPT_P) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p_, dklen=SCRYPT_LEN, maxmem=256 * 1024 * 1024)


class Accounts:
    """The accounts in ``directory`` (made on first use, mode 0700 for the directory).

    Safe to use from threads and from several processes on one directory (each change
    re-reads the file under a lock; reads re-read it when it changed). Hashing is slow on purpose: call ``create``/``verify`` from a worker
    thread (``asyncio.to_thread``) in an event loop.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME
        self._lock = threading.Lock()
        self._records: dict[str, dict] = {}
        self._seen: tuple[int, int, int] | None = None  # the file's (inode, mtime, size) when read
        self._load()
        # Hashing a password for an unknown name too costs as long as a real check,
        # so timing does not tell which names exist.
        self._dummy = {"salt": secrets.token_hex(SALT_BYTES), "hash": "00" * SCRYPT_LEN, "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}

    def _load(self) -> None:
        """Read the file if it changed since we last did (another process, e.g. the IRC
        gateway beside the web one, may have added an account)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._records, self._seen = {}, None
            return
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return
        if st.st_mode & 0o077:
            os.chmod(self.path, 0o600)
        try:
            data = json.loads(self.path.read_text())
            records = data["accounts"]
            if data.get("format") != FORMAT or not isinstance(records, dict):
                raise ValueError("unknown format")
        except (ValueError, KeyError, TypeError) as exc:
            raise AccountError("damaged", f"the accounts file {self.path} is damaged ({exc}): restore it from a backup") from None
        self._records, self._seen = records, seen

    def _refresh(self) -> None:
        """``_load`` for a read. Not while a change holds the lock: it has loaded the
        file itself and is adding to the records, and swapping them under it would make
        it save the older ones (losing accounts just made). Its records are current."""
        if self._lock.acquire(blocking=False):
            try:
                self._load()
            finally:
                self._lock.release()

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Hold the lock of this process and of the directory (``flock`` on a lock file)
        around read, change, write: gateways in several processes share one file and
        none may write over another's new account."""
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.directory / LOCK_NAME, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._load()
                yield
            finally:
                os.close(fd)  # releases the flock

    def _save(self) -> None:
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"format": FORMAT, "accounts": self._records}, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            st = self.path.stat()
            self._seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def __contains__(self, name: object) -> bool:
        self._refresh()
        return name in self._records

    def __len__(self) -> int:
        self._refresh()
        return len(self._records)

    def get(self, name: str) -> Account | None:
        """The account of ``name`` (for the gateway to connect as it), or None."""
        self._refresh()
        rec = self._records.get(name)
        if rec is None:
            return None
        return Account(name=name, secret=rec["secret"], created=rec["created"])

    @staticmethod
    def check_password(password: str) -> None:
        """Raise AccountError for a password that is too short or too long."""
        if not isinstance(password, str) or len(password) < MIN_PASSWORD:
            raise AccountError(AccountError.BAD_PASSWORD, f"the password must have at least {MIN_PASSWORD} characters")
        if len(password) > MAX_PASSWORD:
            raise AccountError(AccountError.BAD_PASSWORD, f"the password must have at most {MAX_PASSWORD} characters")

    def create(self, name: str, password: str, secret: str | None = None) -> Account:
        """Make the account of ``name`` with a new random zchat secret (or ``secret``, to
        bring an existing identity along). Raises AccountError if the name is not a valid
        zchat name, the password is unfit, or the name has an account already.

        The account existing here does not mean the broker gave the name to its key:
        the gateway claims it at first sign-in and calls ``remove`` if that is refused.
        """
        if not isinstance(name, str) or not p.valid_name(name):
            raise AccountError(AccountError.BAD_NAME, f"bad name {name!r}: use a-z, 0-9, '_', '-' (1-{p.MAX_NAME_LEN} characters, lowercase)")
        self.check_password(password)
        salt = secrets.token_bytes(SALT_BYTES)
        digest = _hash(password, salt)
        secret = secret or secrets.token_urlsafe(32)  # as zchat.config.load_secret makes them
        with self._changing():
            if name in self._records:
                raise AccountError(AccountError.TAKEN, f"the name {name!r} has an account here already")
            if len(self._records) >= MAX_ACCOUNTS:
                raise AccountError(AccountError.FULL, f"this gateway holds {MAX_ACCOUNTS} accounts, its most")
            now = time.time()
            self._records[name] = {
                "salt": salt.hex(), "hash": digest.hex(), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                "secret": secret, "created": now,
            }
            self._save()
        log.info("made the account %r", name)
        return Account(name=name, secret=secret, created=now)

    def verify(self, name: str, password: str) -> bool:
        """True if ``password`` is ``name``'s. An unknown name, a bad name and a wrong
        password all give False, after the same scrypt work."""
        if not isinstance(password, str) or len(password) > MAX_PASSWORD:
            return False
        self._refresh()
        rec = self._records.get(name) if isinstance(name, str) else None
        ref = rec if rec is not None else self._dummy
        try:
            digest = _hash(password, bytes.fromhex(ref["salt"]), int(ref["n"]), int(ref["r"]), int(ref["p"]))
        except (ValueError, KeyError):
            log.error("the account %r has a damaged password hash", name)
            return False
        same = hmac.compare_digest(digest, bytes.fromhex(ref["hash"]))
        return same and rec is not None

    def set_password(self, name: str, password: str) -> None:
        """Replace ``name``'s password (an operator's reset); raises AccountError."""
        self.check_password(password)
        salt = secrets.token_bytes(SALT_BYTES)
        digest = _hash(password, salt)
        with self._changing():
            rec = self._records.get(name)
            if rec is None:
                raise AccountError("unknown", f"no account {name!r}")
            rec.update({"salt": salt.hex(), "hash": digest.hex(), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P})
            self._save()

    def remove(self, name: str) -> bool:
        """Forget ``name``'s account (e.g. the broker refused its claim); True if it was there."""
        with self._changing():
            if self._records.pop(name, None) is None:
                return False
            self._save()
        log.info("removed the account %r", name)
        return True


class SignInLimiter:
    """Token buckets for sign-in attempts, one per name and one per source address.

    An attempt is allowed when both its buckets have a token; each holds ``burst``
    tokens and regains ``per_minute`` a minute. At most ``max_keys`` buckets are kept
    (the least recently used go first, a forgotten bucket starts full again), so a
    flood of made-up names or addresses costs bounded memory. A name's bucket stops a
    password being guessed from many addresses; an address's bucket stops one address
    trying many names.
    """

    def __init__(
        self, per_minute: float = 10.0, burst: int = 5, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def _level(self, key: str, now: float) -> float:
        tokens, then = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.rate)

    def allow(self, name: str, address: str) -> float:
        """0.0 if this attempt may go ahead (one token is taken from each bucket), else
        the seconds until it may (nothing is taken)."""
        now = self.clock()
        keys = (f"n:{name}", f"a:{address}")
        levels = [self._level(k, now) for k in keys]
        if min(levels) < 1.0:
            return max((1.0 - lv) / self.rate for lv in levels if lv < 1.0) if self.rate > 0 else float("inf")
        for key, level in zip(keys, levels):
            self._buckets[key] = (level - 1.0, now)
            self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return 0.0

    def __len__(self) -> int:
        return len(self._buckets)
