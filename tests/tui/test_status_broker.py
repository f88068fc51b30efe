"""The TUI's status line names the broker the client is on: with several brokers of one
set, after a failover it shows the one it moved to."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.conftest import HEARTBEAT, RunningBroker
from tests.integration.conftest import redis_url  # noqa: F401  (the fixture)
from tests.tui.test_app import SIZE, connected, status_text, until
from zchat.core import Limits
from zchat.storage.redis import RedisStorage
from zchat.tui.app import ChatApp


async def test_the_status_line_shows_the_broker_after_a_failover(redis_url: str, tmp_path: Path) -> None:  # noqa: F811
    prefix = f"zchat-test:{uuid.uuid4().hex}:"
    limits = Limits(heartbeat=HEARTBEAT, rate=0)
    a = await RunningBroker(tmp_path / "a.db", limits, storage=lambda: RedisStorage(redis_url, prefix=prefix)).start()
    b = await RunningBroker(tmp_path / "b.db", limits, storage=lambda: RedisStorage(redis_url, prefix=prefix)).start()
    try:
        app = ChatApp(f"{a.endpoint},{b.endpoint}", "alice", ["general"], secret="secret-of-alice-0123456789")
        async with app.run_test(size=SIZE) as pilot:
            await connected(pilot)
            assert f" {a.endpoint} " in status_text(app)
            await a.stop()
            await until(pilot, lambda: f" {b.endpoint} " in status_text(app) and "● connected" in status_text(app), "the status on B", timeout=30)
    finally:
        await a.stop()
        await b.stop()
