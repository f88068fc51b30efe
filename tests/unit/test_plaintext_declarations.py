"""The suite's own hygiene: a plaintext declaration a test makes ends with the test
(tests/conftest.py), so a CURVE broker on that port in a later test is spoken to in
CURVE. The two tests run in file order; the second fails if the first one's leaked."""

from __future__ import annotations

from zchat import keys

LEAKY = "tcp://127.0.0.1:1"  # a port no broker binds: only this file declares it


def test_a_test_declares_a_relay_plaintext_and_does_not_undeclare_it() -> None:
    keys.declare_insecure(LEAKY)
    assert keys.is_insecure(LEAKY)


def test_the_next_test_does_not_inherit_that_declaration() -> None:
    assert not keys.is_insecure(LEAKY)
