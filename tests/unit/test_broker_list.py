"""Several broker addresses (one set on one Redis): flags, ZCHAT_BROKER and the TOML
file take a comma-separated list, each address checked, and the client keeps them in order."""

from __future__ import annotations

import pytest

from zchat.client import Client, ClientError, split_addresses
from zchat.config import ConfigError, load_settings

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # 40 Z85 characters
TWO = f"tcp://a.example:5555#k={KEY},tcp://b.example:6000"


def test_split_addresses_keeps_order_and_each_key() -> None:
    assert split_addresses(TWO) == [f"tcp://a.example:5555#k={KEY}", "tcp://b.example:6000"]
    assert split_addresses("tcp://h:1") == ["tcp://h:1"]
    for bad in ("tcp://a:1,", "tcp://a:1,b:2", f"tcp://a:1#k={KEY[:-1]},tcp://b:2"):
        with pytest.raises(ValueError):
            split_addresses(bad)


def test_the_broker_setting_takes_a_list_from_the_file_and_the_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "z.toml"
    path.write_text(f'broker = "{TWO}"\n')
    settings, _ = load_settings({}, path, env={})
    assert settings.broker == TWO
    settings, sources = load_settings({}, None, env={"ZCHAT_BROKER": "tcp://a:1,tcp://b:2"})
    assert settings.broker == "tcp://a:1,tcp://b:2" and sources["broker"] == "env ZCHAT_BROKER"
    path.write_text('broker = "tcp://a:1,localhost:2"\n')
    with pytest.raises(ConfigError, match="'broker'.*tcp://HOST:PORT"):
        load_settings({}, path, env={})


def test_a_client_starts_on_the_first_address() -> None:
    client = Client(TWO, "alice", "secret-of-alice-0123456789")
    assert client.addresses == split_addresses(TWO)
    assert (client.broker, client.base) == ("tcp://a.example:5555", "tcp://a.example")
    with pytest.raises(ClientError):
        Client("tcp://a:1,nonsense", "alice", "secret-of-alice-0123456789")
