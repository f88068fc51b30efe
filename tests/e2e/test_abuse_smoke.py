"""The abuse benchmark keeps working: ``scripts/abuse.py`` end to end on two rows (idle and
heavy-frame), its table and JSON, and the judge of "stored history intact". No assertion
here is about speed or memory: the benchmark reports those, it does not assert them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zchat.bench.abuse import NAMES, limited, missed, table
from zchat.bench.abuse_attacks import ATTACKS, heavy_frame_body, history_intact
from zchat import protocol as p

ROOT = Path(__file__).resolve().parents[2]
HEADER = "| attack | broker RSS MiB before / peak / after | send p50 / p99 ms | history p50 / p99 ms |"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_abuse_quick_prints_the_table_and_the_broker_survives(tmp_path: Path) -> None:
    out = tmp_path / "abuse.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "abuse.py"), "--quick", "--seconds", "1", "--only", "idle,heavy-frame", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, f"abuse failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert HEADER in proc.stdout
    lines = proc.stdout.splitlines()
    assert any(line.startswith("| idle |") for line in lines), proc.stdout
    assert any(line.startswith("| heavy-frame |") for line in lines), proc.stdout

    data = json.loads(out.read_text())
    rows = {row["attack"]: row for row in data["rows"]}
    assert set(rows) == {"idle", "heavy-frame"}
    for name, row in rows.items():
        assert "error" not in row, row
        assert row["broker_process_alive"] and row["alive"], f"{name}: the broker did not survive: {row}"
        assert row["rss_mib"]["before"] > 0 and row["rss_mib"]["peak"] >= row["rss_mib"]["before"]
        assert row["broker_exit"] == 0, f"{name}: the broker did not stop cleanly: {row['broker_exit']}"
    idle = rows["idle"]
    assert idle["intact"], idle["intact_detail"]
    assert idle["send_ms"]["n"] > 0 and idle["history_ms"]["n"] > 0
    assert idle["send_ms"]["failed"] == 0
    heavy = rows["heavy-frame"]
    assert heavy["saw"]["sent"] > 0, "the attacker sent nothing"
    assert heavy["saw"]["notes"]["items_per_frame"] > 60_000
    assert isinstance(heavy["limited"], str) and isinstance(heavy["missed"], list)


def test_zchat_bench_abuse_reaches_the_abuse_benchmark() -> None:
    proc = subprocess.run([sys.executable, "-m", "zchat", "bench", "--abuse", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--only" in proc.stdout and "--seconds" in proc.stdout
    for name in NAMES:
        assert name in proc.stdout


def test_an_unknown_attack_is_refused_with_the_list_of_names() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "abuse.py"), "--only", "idle,nosuch"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "nosuch" in proc.stderr and "heavy-frame" in proc.stderr
    assert HEADER not in proc.stdout  # nothing was run


def test_every_attack_of_the_brief_is_there() -> None:
    assert set(ATTACKS) == {
        "unread-history", "unread-rooms", "stalled-subscriber", "parked-queue", "heavy-frame", "many-rooms",
        "request-flood", "name-squatting", "throwaway-names", "connection-flood", "session-takeover",
    }
    assert NAMES[0] == "idle"


def test_the_heavy_frame_fills_64_kb_with_empty_items() -> None:
    body, n = heavy_frame_body()
    assert len(body) == p.MAX_MESSAGE_BYTES
    import msgspec

    decoded = msgspec.msgpack.decode(body)
    assert decoded["k"] == "sends" and len(decoded["items"]) == n and decoded["items"][0] == {}


def test_history_intact_needs_every_acked_line_once_and_in_order() -> None:
    sent = [("a", True), ("b", False), ("c", True)]
    assert history_intact(sent, [(1, "a"), (2, "b"), (3, "c")])[0]
    assert history_intact(sent, [(1, "a"), (3, "c")])[0]  # an unacked line may be missing
    ok, why = history_intact(sent, [(1, "a")])
    assert not ok and "missing" in why
    ok, why = history_intact(sent, [(1, "a"), (2, "c"), (3, "c")])
    assert not ok and "twice" in why
    ok, why = history_intact(sent, [(1, "c"), (2, "a")])
    assert not ok and "order" in why
    ok, why = history_intact(sent, [(1, "a"), (2, "zzz"), (3, "c")])
    assert not ok and "unknown" in why


def _row(attack: str, **kw: object) -> dict:
    row = {
        "attack": attack, "rss_mib": {"before": 30.0, "peak": 40.0, "after": 35.0},
        "send_ms": {"n": 10, "failed": 0, "p50": 1.0, "p99": 2.0, "max": 2.0},
        "history_ms": {"n": 10, "failed": 0, "p50": 1.0, "p99": 2.0, "max": 2.0},
        "saw": {}, "alive": True, "broker_process_alive": True, "normal_recovered": True,
        "intact": True, "intact_detail": "ok",
    }
    row.update(kw)
    return row


def test_the_verdicts_say_what_the_attacker_saw_and_what_was_missed() -> None:
    idle = _row("idle")
    quiet = _row("request-flood", saw={"sent": 5, "errors": {}, "notes": {}})
    assert limited(quiet) == "no" and missed(quiet, idle) == []
    refused = _row("request-flood", saw={"sent": 5, "errors": {"rate_limited": 3}, "refused": 2, "notes": {}})
    assert limited(refused).startswith("yes") and "rate_limited 3" in limited(refused) and "2 handshakes refused" in limited(refused)
    slow = _row("heavy-frame", send_ms={"n": 3, "failed": 1, "p50": 900.0, "p99": 4000.0, "max": 4000.0},
                rss_mib={"before": 30.0, "peak": 900.0, "after": 50.0})
    miss = missed(slow, idle)
    assert any("send p99" in m for m in miss) and any("RSS" in m for m in miss) and any("failed" in m for m in miss)
    blocked = _row("heavy-frame", history_ms={"n": 0, "failed": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")})
    assert "no history call started in the window" in missed(blocked, idle)
    leak = _row("session-takeover", saw={"notes": {"victim_replies_seen": 4}})
    assert limited(leak).startswith("no") and "victim's replies leaked" in missed(leak, idle)
    dead = _row("many-rooms", alive=False, broker_process_alive=False, intact=False, intact_detail="broker not answering")
    assert "broker died" in missed(dead, idle)
    text = table([idle, quiet, dead])
    assert HEADER in text and "broker DEAD" in text


def test_an_attack_that_ends_before_its_time_comes_back_until_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """stalled-subscriber and throwaway-names end on their own bounds within seconds; the
    normal user must be measured under them for the whole time, so they start again
    (a new round: fresh names and cids) until the deadline. Other attacks run once."""
    import queue
    import threading
    import time

    from zchat.bench.abuse_attacks import REPEATED, ROUND_GAP, Env, attacker

    rounds: list[int] = []
    monkeypatch.setitem(ATTACKS, "throwaway-names", lambda env, saw: rounds.append(env.round))
    monkeypatch.setitem(ATTACKS, "heavy-frame", lambda env, saw: rounds.append(-1))
    assert "throwaway-names" in REPEATED and "heavy-frame" not in REPEATED
    results: queue.Queue = queue.Queue()
    t0 = time.monotonic()
    env = Env(router="", pull="", pub="", deadline=t0 + 2.4 * ROUND_GAP, stop=threading.Event())
    attacker("throwaway-names", env, results)
    assert time.monotonic() - t0 < 4 * ROUND_GAP, "the rounds outlived the deadline"
    assert rounds[0] == 0 and len(rounds) >= 2 and rounds == list(range(len(rounds))), rounds
    tag, saw = results.get_nowait()
    assert tag == "saw" and saw["notes"]["rounds"] == len(rounds)
    rounds.clear()
    attacker("heavy-frame", Env(router="", pull="", pub="", deadline=time.monotonic() + 5, stop=threading.Event()), results)
    assert rounds == [-1], "an attack that runs to its deadline itself is not repeated"
