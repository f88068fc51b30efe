"""Metrics and status of a real broker whose storage refuses writes (SQLite's
max_page_count, as in test_disk_full) and of one that prunes (retention): read through
the broker's own collector and a real client's status request."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BrokerProcess, RunningBroker, free_port_base, wait_for
from tests.e2e.test_ops import scrape, value
from tests.integration.test_disk_full import BIG, cap_pages
from tests.integration.test_limits import RawPeer
from zchat import protocol as p
from zchat.client import Client
from zchat.metrics import BrokerCollector


def read(broker: RunningBroker) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker.broker))  # type: ignore[arg-type]
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


async def test_an_unwritable_store_shows_in_metrics_and_status_until_it_writes_again(broker: RunningBroker) -> None:
    peer = RawPeer(broker, "writer", "writer-1")
    looker = Client.looker(broker.endpoint)
    await looker.connect()
    try:
        assert isinstance(await peer.ask(p.Hello(rid=1)), p.Welcome)
        assert isinstance(await peer.ask(p.Join(rid=2, room="room")), p.Joined)
        assert value(read(broker), "zchat_storage_unavailable_seconds") == 0
        assert (await looker.status()).storage_unavailable == 0
        cap_pages(broker, 0)
        for i in range(3):
            refused = await peer.ask(p.Send(sid="writer-1", cid=f"c{i}", text=BIG, room="room"))
            assert isinstance(refused, p.Error) and refused.code == p.ErrorCode.STORAGE_UNAVAILABLE
        during = read(broker)
        assert value(during, "zchat_storage_unavailable_seconds") > 0
        assert value(during, "zchat_store_failures_total") == 3
        assert value(during, "zchat_errors_total", code="storage_unavailable", what="line") == 3
        status = await looker.status()
        assert status.storage_unavailable > 0
        cap_pages(broker, 100_000)
        assert isinstance(await peer.ask(p.Send(sid="writer-1", cid="c0", text="after", room="room")), p.Ack)
        assert value(read(broker), "zchat_storage_unavailable_seconds") == 0
        assert (await looker.status()).storage_unavailable == 0
    finally:
        peer.close()
        await looker.close()


async def test_retention_counts_what_it_pruned(tmp_path: Path, cli_env: dict[str, str]) -> None:
    port = free_port_base(1)
    url = f"http://127.0.0.1:{port}/metrics"
    flags = ("--retain-messages", "3", "--metrics", f"127.0.0.1:{port}")
    first = BrokerProcess(tmp_path / "h.db", cli_env, *flags).start()
    try:
        client = Client(first.endpoint, "alice", "secret-of-alice-0123456789")
        await client.connect()
        await client.join("dev")
        for i in range(10):
            await client.send("dev", f"line {i}")
        await client.close()
        samples = await asyncio.to_thread(scrape, url)
        assert value(samples, "zchat_retention_pruned_total") == 0  # its first pass ran before any line
    finally:
        first.stop()
    # Restarted on the same ports and file, it prunes at once: a join and ten lines down to 3.
    again = BrokerProcess(tmp_path / "h.db", cli_env, *flags)
    again.port, again.endpoint = first.port, first.endpoint
    again.start()
    try:
        last: dict = {}

        def passed() -> bool:
            last.update(scrape(url))
            return value(last, "zchat_retention_passes_total") >= 1

        await wait_for(passed, timeout=15, what="a retention pass")
        assert value(last, "zchat_retention_pruned_total") == 8
        assert value(last, "zchat_retention_busy_seconds_total") > 0
    finally:
        again.stop()


async def test_the_search_index_shows_how_far_behind_it_is(broker: RunningBroker) -> None:
    """An index thread that stopped (a stuck disk, say) shows in metrics: the commits it
    has not indexed, and the size of its file; a working one comes back to 0."""
    client = Client(broker.endpoint, "indexer", "secret-of-indexer-0123456789")
    await client.connect()
    try:
        await client.join("general")
        await client.send("general", "indexed words")
        await wait_for(lambda: value(read(broker), "zchat_search_index_behind") == 0, what="the index caught up")
        assert value(read(broker), "zchat_search_index_bytes") > 0
        index = broker.broker.storage._search  # type: ignore[attr-defined]
        index._stopping = True
        index._wake.set()
        index._hurry.set()
        index._thread.join(5)
        await client.send("general", "left behind")
        assert value(read(broker), "zchat_search_index_behind") >= 1
    finally:
        await client.close()
