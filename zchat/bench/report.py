"""Turning result rows into the markdown table, the targets, the JSON file and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from zchat.bench.common import LABELS, SYSTEMS, VARIANTS

PEER_FOR_RATIO = ("zmq-proxy", "py-forwarder", "redis", "threaded")


def _find(rows: list[dict], scenario: str, param: Any, system: str) -> dict | None:
    for row in rows:
        if row["scenario"] == scenario and row["param"] == param and row["system"] == system:
            return row
    return None


def _get(row: dict | None, path: str) -> Any:
    if row is None or "error" in row or "impossible" in row:
        return None
    value: Any = row
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return "—"
        if unit == "ms":
            return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"
        if unit in ("%", "us", "MB", "s"):
            return f"{value:.1f}" if value < 100 else f"{value:,.0f}"
        return f"{value:,.0f}"
    return str(value)


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return "—"
    return f"{a / b:.2f}x"


def _cell(row: dict | None, path: str, unit: str) -> str:
    if row is None:
        return "—"
    if "error" in row:
        return "failed"
    if "impossible" in row:
        return "impossible"
    value = _get(row, path)
    text = _fmt(value, unit)
    if value is not None and row.get("incomplete") and path.endswith("rate"):
        text += " (incomplete)"
    return text


def metric_lines(rows: list[dict], systems: list[str]) -> list[tuple[str, str, str, str, bool]]:
    """(scenario label, metric label, scenario, param/path spec, higher is better) for the table."""
    out: list[tuple[str, str, str, str, bool]] = []
    params = {(r["scenario"], r["param"]) for r in rows}
    def has(s: str, p: Any) -> bool:
        return (s, p) in params
    for pubs in sorted({p for s, p in params if s == "ingest"}):
        label = f"Ingest, {pubs} publisher{'s' if pubs > 1 else ''}"
        out.append((label, "msgs/s stored and delivered", "ingest", f"{pubs}|delivery_rate|", True))
        out.append((label, "server CPU per msg (µs)", "ingest", f"{pubs}|cpu_us_per_msg|us", False))
        out.append((label, "publishers' CPU per msg (µs)", "ingest", f"{pubs}|pub_cpu_us_per_msg|us", False))
        out.append((label, "subscriber's CPU per delivery (µs)", "ingest", f"{pubs}|sub_cpu_us_per_delivery|us", False))
    for subs in sorted({p for s, p in params if s == "fanout"}):
        label = f"Fan-out, {subs} subscribers"
        out.append((label, "deliveries/s", "fanout", f"{subs}|delivery_rate|", True))
        out.append((label, "server CPU per msg (µs)", "fanout", f"{subs}|cpu_us_per_msg|us", False))
        out.append((label, "publisher's CPU per msg (µs)", "fanout", f"{subs}|pub_cpu_us_per_msg|us", False))
        out.append((label, "subscribers' CPU per delivery (µs)", "fanout", f"{subs}|sub_cpu_us_per_delivery|us", False))
    for subs in sorted({p for s, p in params if s == "latency"}, reverse=True):
        for q in ("p50", "p99", "p99.9"):
            out.append((f"Latency at 2,000 msgs/s, {subs} sub{'s' if subs > 1 else ''}", f"{q} (ms)", "latency", f"{subs}|latency_ms/{q}|ms", False))
        out.append((f"Latency at 2,000 msgs/s, {subs} sub{'s' if subs > 1 else ''}", "server CPU per msg (µs)", "latency", f"{subs}|cpu_us_per_msg|us", False))
    for subs in sorted({p for s, p in params if s == "fanout"}):
        out.append((f"Loss, fan-out {subs}", "missing at end (all subs)", "fanout", f"{subs}|missing_total|", False))
        out.append((f"Loss, fan-out {subs}", "recovered from history", "fanout", f"{subs}|recovered|", True))
    if has("stall", "without"):
        out.append(("Stalled subscriber", "others' deliveries/s without it", "stall", "without|delivery_rate|", True))
    if has("stall", "with"):
        out.append(("Stalled subscriber", "others' deliveries/s with it", "stall", "with|delivery_rate|", True))
        out.append(("Stalled subscriber", "stalled one: missing at end", "stall", "with|stalled_sub/missing|", False))
        out.append(("Stalled subscriber", "stalled one: recovered from history", "stall", "with|stalled_sub/recovered|", True))
        out.append(("Stalled subscriber", "stalled one: catch-up after resume (s)", "stall", "with|stalled_sub/catch_up_s|s", False))
    for n in sorted({p for s, p in params if s == "scale"}):
        out.append((f"Scale, {n:,} idle clients", "server RSS (MB)", "scale", f"{n}|rest_rss_mb|MB", False))
        out.append((f"Scale, {n:,} idle clients", "server CPU at rest (% of a core)", "scale", f"{n}|rest_cpu_pct|%", False))
        out.append((f"Scale, {n:,} idle clients", "one message to all (ms)", "scale", f"{n}|deliver_all_ms|ms", False))
    for n in sorted({p for s, p in params if s == "chat"}):
        label = f"Realistic chat, {n:,} clients"
        out.append((label, "server CPU (% of a core)", "chat", f"{n}|server_cpu_pct|%", False))
        out.append((label, "p50 (ms)", "chat", f"{n}|latency_ms/p50|ms", False))
        out.append((label, "p99 (ms)", "chat", f"{n}|latency_ms/p99|ms", False))
        out.append((label, "server RSS (MB)", "chat", f"{n}|server_rss_mb|MB", False))
        out.append((label, "missing at end (all listeners)", "chat", f"{n}|missing_total|", False))
    for rows_n in sorted({p for s, p in params if s == "history"}):
        out.append((f"History, last 100 of {rows_n:,}", "median (ms)", "history", f"{rows_n}|median_ms|ms", False))
        out.append((f"History, last 100 of {rows_n:,}", "p99 (ms)", "history", f"{rows_n}|p99_ms|ms", False))
    return out


def _parse_spec(spec: str) -> tuple[Any, str, str]:
    param, path, unit = spec.split("|")
    value: Any = int(param) if param.isdigit() else param
    return value, path, unit


def table(rows: list[dict], systems: list[str]) -> str:
    peers = [s for s in PEER_FOR_RATIO if s in systems]
    head = ["Scenario", "Metric"] + [LABELS[s] for s in systems]
    if "zchat" in systems:
        head += [f"zchat ÷ {LABELS[p]}" for p in peers if p in ("zmq-proxy", "redis")]
        head += [f"zchat ÷ {LABELS[v]}" for v in VARIANTS if v in systems]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for label, metric, scenario, spec, _ in metric_lines(rows, systems):
        param, path, unit = _parse_spec(spec)
        cells = [label, metric]
        for system in systems:
            cells.append(_cell(_find(rows, scenario, param, system), path, unit))
        if "zchat" in systems:
            mine = _get(_find(rows, scenario, param, "zchat"), path)
            for peer in peers:
                if peer in ("zmq-proxy", "redis"):
                    cells.append(_ratio(mine, _get(_find(rows, scenario, param, peer), path)))
            for variant in VARIANTS:
                if variant in systems:
                    cells.append(_ratio(mine, _get(_find(rows, scenario, param, variant), path)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured figure and met / missed."""
    out: list[dict] = []

    def z(s: str, p: Any, path: str) -> Any:
        return _get(_find(rows, s, p, "zchat"), path)

    def peer(s: str, p: Any, system: str, path: str) -> Any:
        return _get(_find(rows, s, p, system), path)

    present = {r["system"] for r in rows}

    def add(name: str, value: float | None, goal: float | None, higher: bool, shown: str, note: str = "") -> None:
        if any(LABELS[s] in name for s in ("zmq-proxy", "py-forwarder") if s not in present):
            return  # a peer this run did not measure (zchat bench --encryption)
        met = None if value is None or goal is None else (value >= goal if higher else value <= goal)
        out.append({"target": name, "measured": shown, "goal": goal, "value": value, "met": met, "note": note})

    for pubs in sorted({r["param"] for r in rows if r["scenario"] == "ingest"}):
        a, b = z("ingest", pubs, "delivery_rate"), peer("ingest", pubs, "zmq-proxy", "delivery_rate")
        ratio = a / b if a and b else None
        add(f"Ingest ({pubs} pub) ≥ 0.5x libzmq proxy", ratio, 0.5, True, _ratio(a, b))
        a, b = z("ingest", pubs, "cpu_us_per_msg"), peer("ingest", pubs, "py-forwarder", "cpu_us_per_msg")
        ratio = a / b if a and b else None
        add(f"Ingest ({pubs} pub) broker CPU/msg ≤ Python forwarder's", ratio, 1.0, False,
            f"{_fmt(a, 'us')} vs {_fmt(b, 'us')} µs ({_ratio(a, b)})")
    if any(r["scenario"] == "fanout" and r["param"] == 100 for r in rows):
        a, b = z("fanout", 100, "delivery_rate"), peer("fanout", 100, "zmq-proxy", "delivery_rate")
        add("Fan-out 100 ≥ 1.0x libzmq proxy", a / b if a and b else None, 1.0, True, _ratio(a, b))
        miss = z("fanout", 100, "missing_total")
        add("Fan-out 100: zero missing after recovery", miss, 0, False, _fmt(miss))
    for lat in sorted({r["param"] for r in rows if r["scenario"] == "latency"}, reverse=True):
        for q, goal in (("p50", 1.5), ("p99", 2.0)):
            a, b = z("latency", lat, f"latency_ms/{q}"), peer("latency", lat, "zmq-proxy", f"latency_ms/{q}")
            add(f"Latency {q} at 2,000/s ({lat} subs) ≤ {goal}x libzmq proxy", a / b if a and b else None, goal, False,
                f"{_fmt(a, 'ms')} vs {_fmt(b, 'ms')} ms ({_ratio(a, b)})")
        a, b = z("latency", lat, "cpu_us_per_msg"), peer("latency", lat, "py-forwarder", "cpu_us_per_msg")
        add(f"Broker CPU/line at 2,000/s ({lat} subs) ≤ 2x Python forwarder's", a / b if a and b else None, 2.0, False,
            f"{_fmt(a, 'us')} vs {_fmt(b, 'us')} µs ({_ratio(a, b)})")
    if any(r["scenario"] == "ingest" and r["param"] == 1 for r in rows):
        a = z("ingest", 1, "pub_cpu_us_per_msg")
        add("Client library CPU per posted line (1 pub, flat out) ≤ 4 µs", a, 4.0, False, f"{_fmt(a, 'us')} µs",
            "the publisher process's CPU (all threads) over lines acked; it also reads its own room")
    if any(r["scenario"] == "stall" for r in rows):
        a, b = z("stall", "with", "delivery_rate"), z("stall", "without", "delivery_rate")
        add("Stalled subscriber: others ≥ 0.9x their rate without it", a / b if a and b else None, 0.9, True, _ratio(a, b))
        miss = z("stall", "with", "stalled_sub/missing")
        add("Stalled subscriber catches up (0 missing)", miss, 0, False, _fmt(miss),
            f"recovered from history: {_fmt(z('stall', 'with', 'stalled_sub/recovered'))}")
    scale = sorted({r["param"] for r in rows if r["scenario"] == "scale"})
    if scale:
        big = scale[-1]
        row = _find(rows, "scale", big, "zchat")
        if row is not None and "impossible" in row:
            feasible = [r for r in rows if r["scenario"] == "scale-max" and r["system"] == "zchat" and "error" not in r]
            note = row["impossible"]
            if feasible:
                f = feasible[0]
                n = f["clients"]
                rss = f["rest_rss_mb"] * big / n
                cpu = f["rest_cpu_pct"] * big / n
                add(f"{big:,} idle clients: broker < 1 GiB RSS", rss, 1024, False,
                    f"not measurable here; {f['rest_rss_mb']:.0f} MB at {n:,} -> about {rss:.0f} MB at {big:,} (linear)", note)
                add(f"{big:,} idle clients: broker < 2% of a core at rest", cpu, 2.0, False,
                    f"not measurable here; {f['rest_cpu_pct']:.2f}% at {n:,} -> about {cpu:.2f}% at {big:,} (linear)", note)
            else:
                add(f"{big:,} idle clients: broker < 1 GiB RSS", None, 1024, False, "impossible here", note)
        else:
            rss, cpu = _get(row, "rest_rss_mb"), _get(row, "rest_cpu_pct")
            add(f"{big:,} idle clients: broker < 1 GiB RSS", rss, 1024, False, f"{_fmt(rss, 'MB')} MB")
            add(f"{big:,} idle clients: broker < 2% of a core at rest", cpu, 2.0, False, f"{_fmt(cpu, '%')}%")
    for r in rows:  # issue 15: the largest zchat idle run, measured (not extrapolated)
        if r["system"] == "zchat" and r["scenario"] == "scale-max" and "error" not in r:
            add(f"{r['clients']:,} idle clients: broker < 0.5% of a core at rest", r["rest_cpu_pct"], 0.5, False,
                f"{r['rest_cpu_pct']:.2f}%")
    encryption(rows, z, peer, add)
    hist = [r for r in rows if r["scenario"] == "history"]
    if hist:
        med = _get(hist[0], "median_ms")
        add(f"Last 100 of {hist[0]['param']:,}: median < 5 ms", med, 5.0, False, f"{_fmt(med, 'ms')} ms")
    behind = []
    checked = 0
    for r in rows:
        if r["system"] != "zchat" or r["scenario"] not in ("ingest", "fanout", "stall"):
            continue
        mine, theirs = _get(r, "delivery_rate"), _get(_find(rows, r["scenario"], r["param"], "redis"), "delivery_rate")
        if mine is None or theirs is None:
            continue
        checked += 1
        if mine < theirs:
            behind.append(f"{r['scenario']} {r['param']}: {mine / theirs:.2f}x")
    if checked:
        add("Ahead of Redis pub/sub on every throughput scenario", float(len(behind)), 0, False,
            "ahead on all" if not behind else "behind on " + ", ".join(behind))
    return out


def encryption(rows: list[dict], z: Any, peer: Any, add: Any) -> None:
    """Issue 18's targets for what CURVE costs, against zchat-plain in the same run: CPU
    per ingested line at most 1.3x, fan-out 100 deliveries at least 0.75x."""
    if not any(r["system"] == "zchat-plain" for r in rows):
        return
    for pubs in sorted({r["param"] for r in rows if r["scenario"] == "ingest"}):
        a, b = z("ingest", pubs, "cpu_us_per_msg"), peer("ingest", pubs, "zchat-plain", "cpu_us_per_msg")
        add(f"CURVE: ingest ({pubs} pub) broker CPU/line ≤ 1.3x plaintext", a / b if a and b else None, 1.3, False,
            f"{_fmt(a, 'us')} vs {_fmt(b, 'us')} µs ({_ratio(a, b)})")
    if any(r["scenario"] == "fanout" and r["param"] == 100 for r in rows):
        a, b = z("fanout", 100, "delivery_rate"), peer("fanout", 100, "zchat-plain", "delivery_rate")
        add("CURVE: fan-out 100 deliveries ≥ 0.75x plaintext", a / b if a and b else None, 0.75, True, _ratio(a, b))


def targets_table(items: list[dict]) -> str:
    lines = ["| Target | Measured (ratio in the same run) | Met |", "|---|---|---|"]
    for t in items:
        met = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
        measured = t["measured"] + (f" — {t['note']}" if t.get("note") else "")
        lines.append(f"| {t['target']} | {measured} | {met} |")
    return "\n".join(lines)


def notes(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"- {r['scenario']} {r['param']} {LABELS.get(r['system'], r['system'])}: FAILED: {r['error'].splitlines()[0]}")
        elif "impossible" in r:
            out.append(f"- {r['scenario']} {r['param']:,} {LABELS.get(r['system'], r['system'])}: impossible here: {r['impossible']}")
        elif r.get("incomplete"):
            out.append(f"- {r['scenario']} {r['param']} {LABELS.get(r['system'], r['system'])}: subscribers did not get every line before the drain deadline")
        if r.get("garbled"):
            out.append(f"- {r['scenario']} {r['param']} {LABELS.get(r['system'], r['system'])}: {r['garbled']:,} garbled lines (no framing)")
        if r["scenario"] == "scale-max" and "error" not in r:
            out.append(
                f"- scale: zchat measured at {r['clients']:,} clients instead of {r.get('instead_of', 10_000):,}: the file-descriptor "
                "limit allows about 6,000 here, and set-up beyond 5,000 (every join returns the whole member list) does not fit the time budget"
            )
    return out


def markdown(meta: dict, rows: list[dict], systems: list[str]) -> str:
    parts = [
        f"# zchat benchmark ({meta['mode']} mode)",
        "",
        f"{meta['when']} on {meta['machine']}; every figure measured in this one run, "
        f"ratios are zchat against the peer in the same run. Total time {meta['elapsed_s']:.0f} s.",
        "",
        table(rows, systems),
        "",
    ]
    extra = [r for r in rows if r["scenario"] == "scale-max"]
    if extra:
        parts += ["Largest zchat scale run possible here:", ""]
        for r in extra:
            if "error" in r:
                parts.append(f"- {r['param']:,} clients: failed: {r['error'].splitlines()[0]}")
            else:
                parts.append(
                    f"- {r['clients']:,} clients: broker RSS {r['rest_rss_mb']:.0f} MB, CPU at rest {r['rest_cpu_pct']:.2f}% of a core, "
                    f"one message to all in {_fmt(r['deliver_all_ms'], 'ms')} ms"
                )
        parts.append("")
    tg = targets(rows) if "zchat" in systems else []
    if tg:
        parts += ["## Targets", "", targets_table(tg), ""]
    n = notes(rows)
    if n:
        parts += ["## Notes", ""] + n + [""]
    return "\n".join(parts)


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    clean = []
    for r in rows:
        clean.append({k: v for k, v in r.items() if not k.startswith("_")})
    path.write_text(json.dumps({"meta": meta, "rows": clean, "targets": targets(rows)}, indent=2, default=str))


def plots(out: Path, rows: list[dict], systems: list[str]) -> list[str] | None:
    """PNG plots if matplotlib is importable (None when it is not); returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    written = []
    fan = [r for r in rows if r["scenario"] == "fanout"]
    if fan:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for system in systems:
            pts = sorted((r["param"], _get(r, "delivery_rate")) for r in fan if r["system"] == system and _get(r, "delivery_rate"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS[system], linewidth=2.5 if system == "zchat" else 1.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("subscribers of one room")
        ax.set_ylabel("deliveries per second")
        ax.set_title("Fan-out throughput against subscribers (same run)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)
        written.append("throughput.png")
    lat = [r for r in rows if r["scenario"] == "latency" and r.get("_latency_sample_ms")]
    if lat:
        params = sorted({r["param"] for r in lat}, reverse=True)
        fig, axes = plt.subplots(1, len(params), figsize=(6 * len(params), 4.5), squeeze=False)
        for ax, param in zip(axes[0], params):
            for system in systems:
                r = _find(lat, "latency", param, system)
                sample = r.get("_latency_sample_ms") if r else None
                if not sample:
                    continue
                ys = [100.0 * (i + 0.5) / len(sample) for i in range(len(sample))]
                ax.plot(sample, ys, label=LABELS[system], linewidth=2.5 if system == "zchat" else 1.5)
            ax.set_xscale("log")
            ax.set_xlabel("end-to-end latency (ms)")
            ax.set_ylabel("percentile")
            ax.set_title(f"Latency at 2,000 msgs/s, {param} subscriber{'s' if param > 1 else ''}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)
        plt.close(fig)
        written.append("latency.png")
    return written


__all__ = ["markdown", "write_json", "plots", "targets", "table", "SYSTEMS"]
