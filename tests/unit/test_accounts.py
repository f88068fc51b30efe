"""zchat.accounts: the gateways' account store and sign-in limiter, on real files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from zchat import accounts as a
from zchat.keys import keypair_from_secret


def test_create_then_verify(tmp_path: Path) -> None:
    store = a.Accounts(tmp_path / "web")
    acct = store.create("alice", "correct horse")
    assert store.verify("alice", "correct horse")
    assert not store.verify("alice", "correct horsE")
    assert not store.verify("alice", "")
    assert acct.secret and acct.name == "alice"
    assert acct.keypair() == keypair_from_secret(acct.secret, "alice")


def test_unknown_name_and_bad_input_are_just_false(tmp_path: Path) -> None:
    store = a.Accounts(tmp_path)
    store.create("alice", "correct horse")
    assert store.verify("bob", "correct horse") is False
    assert store.verify("<script>", "correct horse") is False
    assert store.verify("alice", "x" * (a.MAX_PASSWORD + 1)) is False
    assert store.verify(None, "correct horse") is False  # type: ignore[arg-type]


def test_survives_a_restart_file_is_private_and_holds_no_password(tmp_path: Path) -> None:
    store = a.Accounts(tmp_path / "d")
    secret = store.create("alice", "correct horse").secret
    path = tmp_path / "d" / a.FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "correct horse" not in text
    again = a.Accounts(tmp_path / "d")
    assert again.verify("alice", "correct horse")
    assert again.get("alice").secret == secret  # type: ignore[union-attr]
    assert "alice" in again and len(again) == 1
    assert not [f for f in os.listdir(tmp_path / "d") if f.endswith(".tmp")]


def test_salts_differ_and_params_are_recorded(tmp_path: Path) -> None:
    store = a.Accounts(tmp_path)
    store.create("alice", "same password")
    store.create("bob", "same password")
    recs = json.loads((tmp_path / a.FILE_NAME).read_text())["accounts"]
    assert recs["alice"]["salt"] != recs["bob"]["salt"]
    assert recs["alice"]["hash"] != recs["bob"]["hash"]
    assert recs["alice"]["secret"] != recs["bob"]["secret"]
    assert (recs["alice"]["n"], recs["alice"]["r"], recs["alice"]["p"]) == (2**14, 8, 1)


@pytest.mark.parametrize(
    ("name", "password", "code"),
    [("Alice", "correct horse", "bad_name"), ("<script>", "correct horse", "bad_name"), ("", "correct horse", "bad_name"),
     ("alice", "short", "bad_password"), ("alice", "x" * (a.MAX_PASSWORD + 1), "bad_password")],
)
def test_create_refuses_bad_input_and_changes_nothing(tmp_path: Path, name: str, password: str, code: str) -> None:
    store = a.Accounts(tmp_path)
    with pytest.raises(a.AccountError) as err:
        store.create(name, password)
    assert err.value.code == code and str(err.value)
    assert len(store) == 0 and not (tmp_path / a.FILE_NAME).exists()


def test_create_refuses_a_taken_name(tmp_path: Path) -> None:
    store = a.Accounts(tmp_path)
    first = store.create("alice", "correct horse")
    with pytest.raises(a.AccountError) as err:
        store.create("alice", "another password")
    assert err.value.code == a.AccountError.TAKEN
    assert store.verify("alice", "correct horse") and store.get("alice").secret == first.secret  # type: ignore[union-attr]


def test_remove_and_set_password(tmp_path: Path) -> None:
    store = a.Accounts(tmp_path)
    store.create("alice", "correct horse")
    store.set_password("alice", "battery staple")
    assert not store.verify("alice", "correct horse") and store.verify("alice", "battery staple")
    assert store.remove("alice") and not store.remove("alice")
    assert not a.Accounts(tmp_path).verify("alice", "battery staple")


def test_two_stores_on_one_directory_lose_nothing(tmp_path: Path) -> None:
    web, irc = a.Accounts(tmp_path), a.Accounts(tmp_path)  # e.g. zchat web and zchat irc
    web.create("alice", "correct horse")
    irc.create("bob", "correct horse")  # must not write over alice
    assert web.verify("bob", "correct horse") and irc.verify("alice", "correct horse")
    assert "bob" in web and len(a.Accounts(tmp_path)) == 2
    with pytest.raises(a.AccountError) as err:
        irc.create("alice", "another password")
    assert err.value.code == a.AccountError.TAKEN
    assert web.remove("bob") and "bob" not in irc


def test_damaged_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / a.FILE_NAME).write_text("{not json")
    with pytest.raises(a.AccountError, match="damaged"):
        a.Accounts(tmp_path)


def test_a_given_secret_is_kept(tmp_path: Path) -> None:
    store = a.Accounts(tmp_path)
    assert store.create("carol", "correct horse", secret="s" * 40).secret == "s" * 40


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_per_name_across_addresses() -> None:
    clock = Clock()
    lim = a.SignInLimiter(per_minute=6, burst=3, clock=clock)
    assert [lim.allow("alice", f"10.0.0.{i}") for i in range(3)] == [0.0, 0.0, 0.0]
    wait = lim.allow("alice", "10.0.0.9")
    assert wait == pytest.approx(10.0)  # one token every 10 s
    assert lim.allow("bob", "10.0.0.9") == 0.0  # another name from a fresh address is fine
    clock.now += 10.0
    assert lim.allow("alice", "10.0.0.8") == 0.0


def test_limiter_per_address_across_names() -> None:
    clock = Clock()
    lim = a.SignInLimiter(per_minute=60, burst=2, clock=clock)
    assert lim.allow("n1", "1.2.3.4") == 0.0 and lim.allow("n2", "1.2.3.4") == 0.0
    assert lim.allow("n3", "1.2.3.4") > 0
    assert lim.allow("n3", "5.6.7.8") == 0.0


def test_limiter_refusal_takes_nothing() -> None:
    clock = Clock()
    lim = a.SignInLimiter(per_minute=60, burst=1, clock=clock)
    assert lim.allow("alice", "A") == 0.0
    assert lim.allow("alice", "B") > 0  # the name is empty: B's bucket must stay full
    assert lim.allow("bob", "B") == 0.0


def test_limiter_memory_is_bounded() -> None:
    lim = a.SignInLimiter(max_keys=100, clock=Clock())
    for i in range(10_000):
        lim.allow(f"user{i}", f"addr{i}")
    assert len(lim) <= 100


def test_reads_during_creates_on_threads_lose_no_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The web gateway creates accounts on worker threads while its loop reads: a read
    that reloads the file must not swap the records under a create in progress (which
    then saved the older records, losing accounts just made: sign-up answered 500)."""
    import threading

    monkeypatch.setattr(a, "_hash", lambda password, salt, *rest: b"\0" * a.SCRYPT_LEN)  # the race, not scrypt
    store = a.Accounts(tmp_path)
    names = [f"user{i}" for i in range(300)]
    done = threading.Event()

    def create(part: list[str]) -> None:
        for name in part:
            store.create(name, "correct horse")

    threads = [threading.Thread(target=create, args=(names[k::3],)) for k in range(3)]
    for t in threads:
        t.start()
    watcher = threading.Thread(target=lambda: [t.join() for t in threads] and done.set())
    watcher.start()
    while not done.is_set():
        store.get("user0")
        len(store)
    watcher.join()
    assert sorted(a.Accounts(tmp_path)._records) == sorted(names)
    assert all(store.get(n) is not None for n in names)
