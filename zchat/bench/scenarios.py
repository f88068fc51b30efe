"""The scenarios of the benchmark, each run once per system with a fresh server.

Every function returns a list of result rows ``{"scenario", "param", "system", ...}``;
a failed run returns a row with ``"error"`` so the rest of the benchmark goes on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from zchat.bench import procs, servers
from zchat.bench.clients import Ctl, PubPlan, publisher, sub_group
from zchat.bench.common import ROOM, SECRET, VARIANTS, Sizes, base, now

MAX_GROUP = {"zchat": 1000, "zmq-proxy": 1000, "py-forwarder": 1000, "redis": 1000, "threaded": 1000}
FDS_PER_CLIENT_AT_SERVER = {"zchat": 2, "zmq-proxy": 1, "py-forwarder": 1, "redis": 1, "threaded": 1}
for _variant in VARIANTS:
    MAX_GROUP[_variant], FDS_PER_CLIENT_AT_SERVER[_variant] = MAX_GROUP["zchat"], FDS_PER_CLIENT_AT_SERVER["zchat"]
FD_MARGIN = 2000  # reconnects and half-closed connections need spare descriptors near the limit


SCALE_MAX_RUN = 5000  # the largest zchat scale run the benchmark attempts in its time budget


def max_clients(system: str, hard: int) -> int:
    """The most clients of ``system`` one server process can hold under RLIMIT_NOFILE ``hard``."""
    return int((hard - FD_MARGIN) // FDS_PER_CLIENT_AT_SERVER[system] // 500 * 500)


class BenchError(RuntimeError):
    pass


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclasses.dataclass
class Traffic:
    """One run of publishers and subscriber groups against a started server."""

    server: servers.Server
    groups: list[int]  # subscribers per group
    pubs: int
    plan: PubPlan
    mode: str  # subscriber mode: count, latency or scale
    drain: float
    quiet: float = 1.0
    stalled: int | None = None  # index of a group to SIGSTOP before go (resumed at the end)
    ready_timeout: float = 60.0
    settle: float = 0.0  # seconds to wait between ready and go (scale: let connections settle)
    rest: float = 0.0  # scale: seconds of idle measurement before go
    singles: int = 0  # scale: lines sent one at a time after go (via flush)
    on_go: Callable[[int], Callable[[], None]] | None = None  # e.g. start a profiler; returns its stopper
    pub_target: Callable[..., None] = publisher  # a publisher process's body (chat: talkers)
    _early: set = dataclasses.field(default_factory=set)

    def run(self) -> dict[str, Any]:
        m = procs.mp()
        system, ep = self.server.system, dict(self.server.endpoints, groups=len(self.groups))
        ctl = Ctl.make()
        expected = [m.Value("q", -1) for _ in self.groups]
        group_procs, pub_procs, pipes = [], [], []
        out: dict[str, Any] = {}
        stop_hook = None
        try:
            for gid, n in enumerate(self.groups):
                group_procs.append(procs.spawn(sub_group, system, ep, n, gid, self.mode, ctl, expected[gid], self.quiet, name=f"subs{gid}"))
            for idx in range(self.pubs):
                mine, theirs = m.Pipe()
                pipes.append(mine)
                pub_procs.append(procs.spawn(self.pub_target, system, ep, idx, self.plan, ctl, theirs, name=f"pub{idx}"))
            connected = {("connected", g) for g in range(len(self.groups))}
            self._wait_ready(ctl, connected, group_procs + pub_procs)
            ctl.join_go.set()  # zchat: join only once everyone is connected (no N*N/2 presence notices)
            need = {("sub", g) for g in range(len(self.groups))} | {("pub", i) for i in range(self.pubs)}
            self._wait_ready(ctl, need, group_procs + pub_procs)
            ctl.probes_off.set()
            time.sleep(0.15 + self.plan.probe)
            if self.stalled is not None:
                os.kill(group_procs[self.stalled].pid, signal.SIGSTOP)
            if self.settle:
                time.sleep(self.settle)
            spid = self.server.pid
            if self.rest:
                c0, t0 = procs.cpu_seconds(spid), now()
                time.sleep(self.rest)
                c1, t1 = procs.cpu_seconds(spid), now()
                out["rest_cpu_pct"] = 100.0 * (c1 - c0) / (t1 - t0)
                out["rest_rss"] = procs.rss_bytes(spid)
            cpu0 = procs.cpu_seconds(spid)
            ctl.go.set()
            stop_hook = self.on_go(spid) if self.on_go else None
            got: dict[tuple[str, int], dict] = {}
            pub_limit = (self.plan.window if self.plan.mode == "blast" else self.plan.seconds) + 60.0
            self._collect(ctl, got, {("pub", i) for i in range(self.pubs)}, pub_limit, group_procs + pub_procs)
            pubs = [got[("pub", i)] for i in range(self.pubs)]
            others_sent = sum(p["sent"] for p in pubs[1:])
            total = others_sent + pubs[0]["sent"]
            single_at: list[float] = []
            for k in range(max(1, self.singles)):  # the flush line(s): counted, never timed
                if k:
                    time.sleep(0.3)
                single_at.append(now())
                total = others_sent + self._flush(pipes[0])
            others = [g for g in range(len(self.groups)) if g != self.stalled]
            for g in others:
                expected[g].value = total
            waiting = {("sub", g) for g in others}
            if not self._collect(ctl, got, waiting, self.drain + self.quiet + 2, group_procs, soft=True):
                ctl.stop.set()
                self._collect(ctl, got, waiting, 15.0, group_procs, soft=True)
            cpu1 = procs.cpu_seconds(spid)
            if stop_hook is not None:
                stop_hook()
                stop_hook = None
            out.update(cpu_s=cpu1 - cpu0, rss=procs.rss_bytes(spid), rss_peak=vm_hwm(spid), expected=total, pubs=pubs)
            out["groups"] = {g: got.get(("sub", g)) for g in others}
            if self.stalled is not None:
                os.kill(group_procs[self.stalled].pid, signal.SIGCONT)
                out["t_cont"] = now()
                stalled_total = others_sent + self._flush(pipes[0])  # a chat goes on: a newer line
                expected[self.stalled].value = stalled_total
                key = ("sub", self.stalled)
                if not self._collect(ctl, got, {key}, self.drain + self.quiet + 2, group_procs, soft=True):
                    ctl.stop.set()
                    self._collect(ctl, got, {key}, 15.0, group_procs, soft=True)
                out["stalled"] = got.get(key)
                out["stalled_expected"] = stalled_total
            out["single_at"] = single_at
            return out
        finally:
            if stop_hook is not None:
                stop_hook()
            ctl.stop.set()
            for pipe in pipes:
                try:
                    pipe.send("exit")
                except (OSError, BrokenPipeError):
                    pass
            for proc in pub_procs + group_procs:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            deadline = now() + 8
            for proc in pub_procs + group_procs:
                proc.join(max(0.1, deadline - now()))
            for proc in pub_procs + group_procs:
                procs.stop(proc, grace=1.0)

    @staticmethod
    def _flush(pipe: Any) -> int:
        """Publisher 0 sends one more (FL) line; returns its count of lines sent."""
        pipe.send("flush")
        if not pipe.poll(30):
            raise BenchError("publisher 0 did not confirm its flush line")
        return int(pipe.recv())

    @staticmethod
    def _check_errors(ctl: Ctl) -> None:
        while True:
            try:
                item = ctl.ready.get_nowait()
            except queue.Empty:
                return
            if item[0] == "error":
                raise BenchError(f"{item[1]} failed:\n{item[2]}")

    def _wait_ready(self, ctl: Ctl, need: set, workers: list) -> None:
        deadline = now() + self.ready_timeout
        early = self._early
        need -= early
        while need:
            try:
                item = ctl.ready.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is not None:
                if item[0] == "error":
                    raise BenchError(f"{item[1]} failed:\n{item[2]}")
                if tuple(item[:2]) in need:
                    need.discard(tuple(item[:2]))
                else:  # a later stage's signal (a publisher ready before the groups connected)
                    early.add(tuple(item[:2]))
            if now() > deadline:
                raise BenchError(f"not ready after {self.ready_timeout:.0f}s: {sorted(need)}")
            dead = [w.pid for w in workers if not w.is_alive()]
            if dead and need:
                self._check_errors(ctl)
                raise BenchError(f"worker processes {dead} exited before the start")

    def _collect(self, ctl: Ctl, got: dict, want: set, timeout: float, workers: list, soft: bool = False) -> bool:
        deadline = now() + timeout
        while not want <= set(got):
            try:
                kind, idx, data = ctl.results.get(timeout=0.2)
                got[(kind, idx)] = data
            except queue.Empty:
                pass
            self._check_errors(ctl)
            if now() > deadline:
                if soft:
                    return False
                raise BenchError(f"no result from {sorted(want - set(got))} within {timeout:.0f}s")
        return True


# ------------------------------------------------------------------ helpers


def split_groups(n: int, per_group: int, at_least: int = 1) -> list[int]:
    k = max(at_least, math.ceil(n / per_group))
    k = min(k, n)
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def summarize(res: dict[str, Any], groups: dict[int, dict | None]) -> dict[str, Any]:
    """Rates, loss and latency from a Traffic result (the non-stalled groups)."""
    pubs = res["pubs"]
    t_first = min(p["t_first"] for p in pubs)
    t_pub_end = max(p["t_end"] for p in pubs)
    sent = sum(p["sent"] for p in pubs)
    counts: list[int] = []
    lasts: list[float] = []
    lat: list[float] = []
    hop: list[float] = []
    recovered = gaps = garbled = could_not_join = 0
    incomplete = False
    import array

    stuck: list = []
    silent = 0
    sub_cpu = 0.0
    for g in groups.values():
        if g is None:
            incomplete = True
            silent += 1
            continue
        sub_cpu += g.get("cpu_s", 0.0)
        stuck += g.get("stuck", [])
        dead = set(g.get("dead", ()))
        could_not_join += len(dead)
        counts += [c for i, c in enumerate(g["counts"]) if i not in dead]
        lasts += [t for t in g["last"] if t]
        recovered += sum(g["recovered"])
        gaps += sum(g["gaps"])
        garbled += sum(g["garbled"])
        incomplete = incomplete or g["incomplete"]
        for key, into in (("lat", lat), ("hop", hop)):
            if g.get(key):
                a = array.array("d")
                a.frombytes(g[key])
                into += a.tolist()
    expected = res["expected"]
    t_last = max(lasts) if lasts else t_pub_end
    elapsed = max(t_last, t_pub_end) - t_first
    delivered = sum(counts)
    missing = [max(0, expected - c) for c in counts]
    out = {
        "sent": sent,
        "expected_per_sub": expected,
        "subscribers": len(counts),
        "delivered": delivered,
        "elapsed_s": elapsed,
        "publish_rate": sent / max(1e-9, t_pub_end - t_first),
        "delivery_rate": delivered / max(1e-9, elapsed),
        "server_cpu_s": res["cpu_s"],
        "cpu_us_per_msg": 1e6 * res["cpu_s"] / max(1, sent),
        "cpu_us_per_delivery": 1e6 * res["cpu_s"] / max(1, delivered),
        # Each role's CPU (every thread of its processes, go to done), so a reader sees the limit.
        "pub_cpu_s": sum(p.get("cpu_s", 0.0) for p in pubs),
        "pub_cpu_us_per_msg": 1e6 * sum(p.get("cpu_s", 0.0) for p in pubs) / max(1, sent),
        "sub_cpu_s": sub_cpu,
        "sub_cpu_us_per_delivery": 1e6 * sub_cpu / max(1, delivered),
        "server_rss_mb": res["rss"] / 2**20,
        "server_rss_peak_mb": res["rss_peak"] / 2**20,
        "missing_total": sum(missing),
        "missing_max": max(missing) if missing else 0,
        "subs_missing": sum(1 for x in missing if x),
        "recovered": recovered,
        "unrecoverable": gaps,
        "garbled": garbled,
        "incomplete": incomplete,
        "could_not_join": could_not_join,
        "groups_without_report": silent,
        "stuck": stuck[:10],
    }
    if lat:
        lat.sort()
        out["latency_ms"] = {
            "p50": 1e3 * percentile(lat, 0.5), "p90": 1e3 * percentile(lat, 0.9), "p99": 1e3 * percentile(lat, 0.99),
            "p99.9": 1e3 * percentile(lat, 0.999), "max": 1e3 * lat[-1], "n": len(lat),
        }
        step = max(1, len(lat) // 2000)
        out["_latency_sample_ms"] = [1e3 * x for x in lat[::step]]
    if hop:  # zchat: the broker's stamp (wall clock) to the subscriber's hand
        hop.sort()
        out["broker_to_sub_ms"] = {q: 1e3 * percentile(hop, v) for q, v in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))}
    return out


class Bench:
    """Runs scenarios for the chosen systems; owns a temp dir; reports progress."""

    def __init__(self, sizes: Sizes, systems: list[str], progress: Callable[[str], None], workdir: Path) -> None:
        self.sizes = sizes
        self.systems = systems
        self.progress = progress
        self.workdir = workdir
        self.counter = 0

    def _tmp(self, label: str) -> Path:
        self.counter += 1
        path = self.workdir / f"{self.counter:03d}-{label}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _guard(self, scenario: str, param: Any, system: str, body: Callable[[], dict]) -> dict:
        self.progress(f"{scenario} {param} {system}")
        row = {"scenario": scenario, "param": param, "system": system}
        started = now()
        try:
            row.update(body())
        except Exception as exc:  # one failed run must not sink the benchmark
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        finally:
            procs.stop_all()
        row["wall_s"] = now() - started
        return row

    def _traffic(self, system: str, label: str, **kw: Any) -> dict:
        seed = None
        if base(system) == "zchat":
            seed = member_seed([f"s{g}-{i}" for g, size in enumerate(kw["groups"]) for i in range(size)] + [f"p{i}" for i in range(kw["pubs"])])
        server = servers.start(system, self._tmp(f"{label}-{system}"), self.sizes.heartbeat, seed=seed)
        try:
            res = Traffic(server=server, drain=self.sizes.drain, **kw).run()
        finally:
            server.stop()
        return res

    # -------------------------------------------------------------- scenarios

    def ingest(self, system: str, pubs: int) -> dict:
        def body() -> dict:
            plan = PubPlan("blast", budget=max(1, self.sizes.ingest_budget // pubs), window=self.sizes.window)
            res = self._traffic(system, f"ingest{pubs}", groups=[1], pubs=pubs, plan=plan, mode="count")
            return summarize(res, res["groups"])

        return self._guard("ingest", pubs, system, body)

    def fanout(self, system: str, subs: int) -> dict:
        def body() -> dict:
            budget = max(10, self.sizes.fanout_deliveries // subs)
            plan = PubPlan("blast", budget=budget, window=self.sizes.window, probe=0.02 if subs < 500 else 0.1)
            groups = split_groups(subs, MAX_GROUP[system], at_least=2 if subs >= 2 else 1)
            res = self._traffic(system, f"fanout{subs}", groups=groups, pubs=1, plan=plan, mode="count")
            return summarize(res, res["groups"])

        return self._guard("fanout", subs, system, body)

    def latency(self, system: str, subs: int) -> dict:
        def body() -> dict:
            plan = PubPlan("paced", rate=self.sizes.latency_rate, seconds=self.sizes.latency_seconds)
            groups = split_groups(subs, MAX_GROUP[system], at_least=2 if subs >= 2 else 1)
            res = self._traffic(system, f"latency{subs}", groups=groups, pubs=1, plan=plan, mode="latency")
            return summarize(res, res["groups"])

        return self._guard("latency", subs, system, body)

    def stall(self, system: str, stalled: bool) -> dict:
        def body() -> dict:
            n = self.sizes.stall_subs
            plan = PubPlan("blast", budget=self.sizes.stall_messages, window=self.sizes.stall_window)
            groups = split_groups(n, MAX_GROUP[system], at_least=min(2, n))
            if stalled:
                groups = groups + [1]
            res = self._traffic(
                system, "stall" if stalled else "nostall", groups=groups, pubs=1, plan=plan, mode="count",
                stalled=len(groups) - 1 if stalled else None,
            )
            out = summarize(res, res["groups"])
            if stalled:
                s = res.get("stalled")
                exp = res["stalled_expected"]
                if s is None:
                    out["stalled_sub"] = {"missing": exp, "recovered": 0, "catch_up_s": None, "incomplete": True}
                else:
                    last = max(s["last"]) if max(s["last"]) else 0.0
                    out["stalled_sub"] = {
                        "expected": exp, "received": s["counts"][0], "missing": max(0, exp - s["counts"][0]),
                        "recovered": s["recovered"][0], "unrecoverable": s["gaps"][0],
                        "catch_up_s": (last - res["t_cont"]) if last else None, "incomplete": s["incomplete"],
                        "garbled": s["garbled"][0],
                    }
            return out

        return self._guard("stall", "with" if stalled else "without", system, body)

    def scale(self, system: str, n: int) -> dict:
        def body() -> dict:
            soft, hard = procs.raise_nofile()
            need = FDS_PER_CLIENT_AT_SERVER[system] * n + FD_MARGIN
            if need > hard:
                per = FDS_PER_CLIENT_AT_SERVER[system]
                return {
                    "impossible": (
                        f"{n:,} {system} clients need about {need:,} file descriptors in the server process "
                        f"({per} TCP connection{'s' if per > 1 else ''} per client), but RLIMIT_NOFILE's hard limit here is "
                        f"{hard:,} and this container may not raise it (no CAP_SYS_RESOURCE)"
                    ),
                    "max_feasible": max_clients(system, hard),
                }
            return self._scale_run(system, n)

        return self._guard("scale", n, system, body)

    def _scale_run(self, system: str, n: int) -> dict:
        groups = split_groups(n, MAX_GROUP[system])
        seed = None
        if base(system) == "zchat":
            names = [f"s{g}-{i}" for g, size in enumerate(groups) for i in range(size)] + ["p0"]
            seed = member_seed(names)
        # Scale uses zchat's default heartbeat, as a user's broker would.
        from zchat.core import Limits

        server = servers.start(system, self._tmp(f"scale{n}-{system}"), Limits().heartbeat, seed=seed)
        try:
            # Every probe reaches all n clients: keep that a small load (a zchat delivery
            # costs its client process about 150 µs here, a SUB socket's a few µs).
            per = 300e-6 if base(system) == "zchat" else 30e-6
            plan = PubPlan("none", probe=max(0.25, n * per))
            started = now()
            res = Traffic(
                server=server, groups=groups, pubs=1, plan=plan, mode="scale", drain=self.sizes.drain, quiet=3.0,
                settle=0.5 if self.sizes.name != "full" else 1.0, rest=self.sizes.scale_rest, singles=3, ready_timeout=200.0,
            ).run()
        finally:
            server.stop()
        maxlat: dict[int, float] = {}
        received = 0
        incomplete = False
        per_group = []
        for g in res["groups"].values():
            if g is None:
                incomplete = True
                per_group.append(None)
                continue
            incomplete = incomplete or g["incomplete"]
            received += sum(c for i, c in enumerate(g["counts"]) if i not in set(g.get("dead", ())))
            per_group.append({"min": min(g["counts"]), "max": max(g["counts"]), "recovered": sum(g["recovered"]),
                              "unrecoverable": sum(g["gaps"]), "incomplete": g["incomplete"], "could_not_join": len(g.get("dead", []))})
            for k, v in g["maxlat"].items():
                maxlat[k] = max(maxlat.get(k, 0.0), v)
        times = sorted(1e3 * v for v in maxlat.values())
        return {
            "clients": n,
            "client_processes": len(groups),
            "rest_rss_mb": res["rest_rss"] / 2**20,
            "rest_cpu_pct": res["rest_cpu_pct"],
            "deliver_all_ms": percentile(times, 0.5) if times else None,
            "deliver_all_ms_each": times,
            "received": received,
            "expected": res["expected"] * n,
            "incomplete": incomplete,
            "setup_s": now() - started,
            "heartbeat_s": Limits().heartbeat if base(system) == "zchat" else None,
            "groups": per_group,
            "could_not_join": sum(g["could_not_join"] for g in per_group if g),
        }

    def history(self) -> dict:
        def body() -> dict:
            tmp = self._tmp("history")
            db = tmp / "history.db"
            t0 = now()
            builder = procs.spawn(_build_history, str(db), self.sizes.history_rows, name="history-builder")
            builder.join(900)
            if builder.exitcode != 0:
                raise BenchError(f"building the history database failed (exit {builder.exitcode})")
            build_s = now() - t0
            server = servers.start("zchat", tmp, 30.0, db=db)
            try:
                results = procs.mp().Queue()
                reader = procs.spawn(_query_history, server.endpoints["broker"], self.sizes.history_queries, results, name="history-client")
                try:
                    times = results.get(timeout=300)
                finally:
                    procs.stop(reader)
            finally:
                server.stop()
            if isinstance(times, str):
                raise BenchError(times)
            times.sort()
            return {
                "rows": self.sizes.history_rows, "queries": len(times), "build_s": build_s,
                "median_ms": percentile(times, 0.5), "p99_ms": percentile(times, 0.99), "min_ms": times[0], "max_ms": times[-1],
                "db_mb": db.stat().st_size / 2**20,
            }

        return self._guard("history", self.sizes.history_rows, "zchat", body)


def member_seed(names: list[str]) -> Callable[[str], Any]:
    """Make every bench client a member of the room already (as if it had joined in an
    earlier session), so setting up N subscribers does not cost N*N/2 join notices.
    Only the set-up changes: the measured traffic is the same."""

    async def seed(db: str) -> None:
        from zchat.storage.sqlite import SqliteStorage

        store = SqliteStorage(db)
        await store.open()
        conn = store._db
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO members (room, name) VALUES (?, ?) ON CONFLICT DO NOTHING", [(ROOM, n) for n in names])
        conn.execute("COMMIT")
        await store.close()

    return seed


def _build_history(db: str, rows: int) -> None:
    """Write ``rows`` messages of one room straight through SqliteStorage.append, in batches."""
    import asyncio

    from zchat import protocol as p
    from zchat.bench.common import text
    from zchat.storage.sqlite import SqliteStorage

    async def build() -> None:
        store = SqliteStorage(db)
        await store.open()
        store._db.execute("PRAGMA synchronous=OFF")
        line = text(0, 0, 0.0)
        ts = time.time() - rows
        batch = 50_000
        for start in range(1, rows + 1, batch):
            msgs = [
                p.Msg(room="big", seq=s, id=f"h{s:x}", ts=ts + s, sender="seed", text=line, cid="")
                for s in range(start, min(rows, start + batch - 1) + 1)
            ]
            await store.append(msgs)
        await store.close()

    asyncio.run(build())


def _query_history(broker: str, queries: int, results: Any) -> None:
    import asyncio

    from zchat.client import Client

    async def run() -> list[float]:
        client = Client(broker, "reader", SECRET, label="bench")
        await client.connect(timeout=60)
        try:
            for _ in range(5):  # warm-up: page cache, statement cache
                await client.history("big", limit=100)
            times = []
            for _ in range(queries):
                t0 = time.perf_counter()
                msgs = await client.history("big", limit=100)
                times.append(1e3 * (time.perf_counter() - t0))
                if len(msgs) != 100:
                    raise RuntimeError(f"history returned {len(msgs)} messages, not 100")
            return times
        finally:
            await client.close()

    try:
        results.put(asyncio.run(run()))
    except Exception as exc:
        results.put(f"history client failed: {type(exc).__name__}: {exc}")
    time.sleep(0.2)


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="zchat-bench-"))
