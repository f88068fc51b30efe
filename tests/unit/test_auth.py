"""Name ownership at the ZAP handshake, decided with plain values."""

from __future__ import annotations

import pytest

from zchat import protocol as p
from zchat.auth import Verdict, check_plain, digest

SECRET = b"0123456789abcdef0123456789abcdef"
OTHER = b"fedcba9876543210fedcba9876543210"


def test_first_claim_is_accepted_with_a_digest_to_store() -> None:
    verdict = check_plain(b"alice", SECRET, None)
    assert verdict == Verdict(b"200", "OK", "alice", claim=digest(SECRET))
    assert verdict.claim is not None and SECRET not in verdict.claim


def test_same_secret_is_accepted_later_without_a_new_claim() -> None:
    stored = check_plain(b"alice", SECRET, None).claim
    assert check_plain(b"alice", SECRET, stored) == Verdict(b"200", "OK", "alice", claim=None)


def test_other_secret_is_refused() -> None:
    stored = digest(SECRET)
    verdict = check_plain(b"alice", OTHER, stored)
    assert verdict.status == b"400"
    assert "taken" in verdict.text
    assert verdict.user_id == ""
    assert verdict.claim is None


def test_digest_is_deterministic_and_distinct() -> None:
    assert digest(SECRET) == digest(SECRET)
    assert digest(SECRET) != digest(OTHER)
    assert len(digest(SECRET)) == 32


@pytest.mark.parametrize(
    "name",
    [b"", b"Alice", b"-alice", b"_alice", b"al ice", b"al.ice", b"a" * (p.MAX_NAME_LEN + 1), b"alice\n", b"al:ice", b"@alice"],
)
def test_bad_names_are_refused(name: bytes) -> None:
    verdict = check_plain(name, SECRET, None)
    assert verdict.status == b"400"
    assert "bad name" in verdict.text
    assert (verdict.user_id, verdict.claim) == ("", None)


def test_longest_name_is_accepted() -> None:
    name = b"a" * p.MAX_NAME_LEN
    assert check_plain(name, SECRET, None).user_id == name.decode()


@pytest.mark.parametrize("secret", [b"", b"x", b"0123456789abcde"])
def test_short_secret_is_refused(secret: bytes) -> None:
    verdict = check_plain(b"alice", secret, None)
    assert verdict.status == b"400"
    assert "short" in verdict.text
    assert verdict.claim is None


def test_sixteen_byte_secret_is_enough() -> None:
    assert check_plain(b"alice", b"0123456789abcdef", None).status == b"200"


@pytest.mark.parametrize("name", [b"\xc3\xa9ve", b"\xff", b"al\x80ce", "ａlice".encode()])
def test_non_ascii_name_is_refused(name: bytes) -> None:
    verdict = check_plain(name, SECRET, None)
    assert verdict.status == b"400"
    assert "ASCII" in verdict.text
    assert verdict.user_id == ""


def test_looker_with_a_long_secret_is_a_look_only_session_never_claimed() -> None:
    verdict = check_plain(p.LOOKER.encode(), b"any-sixteen-byte", None)
    assert verdict == Verdict(b"200", "OK", p.LOOKER, claim=None)


@pytest.mark.parametrize("secret", [b"", b"short", b"0123456789abcde"])
def test_looker_with_a_short_secret_is_refused(secret: bytes) -> None:
    verdict = check_plain(p.LOOKER.encode(), secret, None)
    assert verdict.status == b"400" and "short" in verdict.text
    assert (verdict.user_id, verdict.claim) == ("", None)


def test_looker_is_never_matched_by_prefix_or_suffix() -> None:
    for name in (b"**", b"* ", b"*alice", b"alice*"):
        assert check_plain(name, SECRET, None).status == b"400"


def test_reserved_name_cannot_be_claimed() -> None:
    verdict = check_plain(b"admin", SECRET, None, reserved={"admin", "root"})
    assert verdict.status == b"400"
    assert "reserved" in verdict.text
    assert verdict.claim is None and verdict.user_id == ""
    assert check_plain(b"admins", SECRET, None, reserved={"admin"}).status == b"200"


def test_reserved_name_owned_before_it_was_reserved_keeps_working() -> None:
    assert check_plain(b"admin", SECRET, digest(SECRET), reserved={"admin"}).status == b"200"
    assert check_plain(b"admin", OTHER, digest(SECRET), reserved={"admin"}).status == b"400"
