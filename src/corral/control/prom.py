"""``/metrics``: the fleet's current state in Prometheus text format.

A custom collector reads the database and the latest samples at scrape time instead of keeping
gauges up to date on every heartbeat: there is one source of truth, and an instance that was
removed simply stops appearing (no stale series to forget).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from corral.control.db import Host, Instance, Standby
from corral.control.fleet import Fleet
from corral.control.views import host_view, instance_usage
from corral.lifecycle import ALIVE
from corral.ops.store import FINISHED, operations

#: upper bounds (seconds) of the operation duration histogram: a migration takes a second or
#: two, a shelve of a big disk minutes
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FleetCollector(Collector):
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        with self.fleet.sessions() as s:
            hosts = list(s.scalars(select(Host).order_by(Host.name)))
            instances = list(s.scalars(select(Instance).order_by(Instance.name)))
        ilabels = ["instance", "host", "driver"]
        core = GaugeMetricFamily("corral_instance_cpu_core_percent",
                                 "CPU used by the instance, % of one core", labels=ilabels)
        hpct = GaugeMetricFamily("corral_instance_cpu_host_percent",
                                 "CPU used by the instance, % of its whole host", labels=ilabels)
        mem = GaugeMetricFamily("corral_instance_memory_bytes",
                                "memory used by the instance", labels=ilabels)
        ires_c = GaugeMetricFamily("corral_instance_reserved_cpus",
                                   "CPU reservation of the instance, in cores", labels=ilabels)
        state = GaugeMetricFamily("corral_instance_state",
                                  "1 for the instance's observed state",
                                  labels=[*ilabels, "state"])
        health = GaugeMetricFamily("corral_instance_healthy",
                                   "1 healthy, 0 unhealthy, -1 unknown (instances with a "
                                   "health check)", labels=ilabels)
        for i in instances:
            lv = [i.name, i.host or "", i.driver]
            ires_c.add_metric(lv, i.cpus)
            if i.check_spec:
                health.add_metric(lv, {"healthy": 1.0, "unhealthy": 0.0}.get(i.health or "",
                                                                             -1.0))
            state.add_metric([*lv, i.state], 1.0)
            u = instance_usage(self.fleet, i)
            if u.cpu_core_pct is not None:
                core.add_metric(lv, u.cpu_core_pct)
            if u.cpu_host_pct is not None:
                hpct.add_metric(lv, u.cpu_host_pct)
            if u.memory_bytes is not None:
                mem.add_metric(lv, float(u.memory_bytes))
        cpu_total = CounterMetricFamily(
            "corral_instance_cpu_seconds", "CPU time the instance used since its processes "
            "started (resets when they restart; use rate())", labels=ilabels)
        for i in instances:
            m = self.fleet.fresh_metrics(i.host) if i.host and i.state in ALIVE else None
            sample = m.by_name.get(i.name) if m else None
            if sample is not None:
                cpu_total.add_metric([i.name, i.host or "", i.driver], sample.cpu_ns / 1e9)
        yield from (core, hpct, mem, ires_c, state, health, cpu_total)
        yield from self._standbys()
        yield from self._operations()

        hl = ["host"]
        up = GaugeMetricFamily("corral_host_up", "1 when the host holds a lease", labels=hl)
        cpu = GaugeMetricFamily("corral_host_cpu_percent",
                                "CPU used by corral instances, % of the whole host", labels=hl)
        rest = GaugeMetricFamily("corral_host_rest_cpu_percent",
                                 "CPU used by everything else on the host, % of the host",
                                 labels=hl)
        cores = GaugeMetricFamily("corral_host_cores", "CPU cores of the host", labels=hl)
        rc = GaugeMetricFamily("corral_host_reserved_cpus", "cores reserved by instances",
                               labels=hl)
        rm = GaugeMetricFamily("corral_host_reserved_memory_bytes",
                               "memory reserved by instances", labels=hl)
        for h in hosts:
            v = host_view(self.fleet, h, instances)
            up.add_metric([h.name], 1.0 if h.state == "up" else 0.0)
            cores.add_metric([h.name], float(h.cores))
            rc.add_metric([h.name], v.reserved.cpus)
            rm.add_metric([h.name], float(v.reserved.memory_bytes))
            if v.usage.cpu_host_pct is not None:
                cpu.add_metric([h.name], v.usage.cpu_host_pct)
            if v.rest_host_pct is not None:
                rest.add_metric([h.name], v.rest_host_pct)
        lag = GaugeMetricFamily("corral_host_log_capture_lag_bytes",
                                "bytes instances wrote that have not reached the bus yet",
                                labels=hl)
        for h in hosts:
            m = self.fleet.fresh_metrics(h.name)
            if m is not None and m.sample.log_lag_bytes is not None:
                lag.add_metric([h.name], float(m.sample.log_lag_bytes))
        yield from (up, cpu, rest, cores, rc, rm, lag)

    def _standbys(self) -> Iterator[Metric]:
        """What an operator alerts on for warm copies: how old the data is, how long the
        last freeze took, whether the last refresh failed."""
        with self.fleet.sessions() as s:
            standbys = list(s.scalars(select(Standby).order_by(Standby.instance)))
        sl = ["instance", "host"]
        age = GaugeMetricFamily("corral_standby_data_age_seconds",
                                "how old the standby's copy is (since the frozen pass of its "
                                "last complete refresh)", labels=sl)
        every = GaugeMetricFamily("corral_standby_interval_seconds",
                                  "how often the standby is refreshed", labels=sl)
        freeze = GaugeMetricFamily("corral_standby_last_freeze_seconds",
                                   "how long the instance was frozen in the last refresh",
                                   labels=sl)
        stale = GaugeMetricFamily("corral_standby_failed",
                                  "1 when the last refresh failed (the copy is the one "
                                  "before)", labels=sl)
        syncs = CounterMetricFamily("corral_standby_refreshes",
                                    "complete refreshes of the standby", labels=sl)
        moved = CounterMetricFamily("corral_standby_sent_bytes",
                                    "bytes sent to the standby over all refreshes", labels=sl)
        now = time.time()
        for sb in standbys:
            lv = [sb.instance, sb.host]
            if sb.data_at is not None:
                age.add_metric(lv, max(0.0, now - sb.data_at))
            every.add_metric(lv, sb.every_seconds)
            if sb.last_freeze_ms is not None:
                freeze.add_metric(lv, sb.last_freeze_ms / 1000.0)
            stale.add_metric(lv, 1.0 if sb.state == "stale" else 0.0)
            syncs.add_metric(lv, float(sb.syncs))
            moved.add_metric(lv, float(sb.total_bytes))
        yield from (age, every, freeze, stale, syncs, moved)

    def _operations(self) -> Iterator[Metric]:
        """Operations by kind and outcome, and how long the finished ones took, counted by
        the database in one query (no per-row work at scrape time)."""
        dur = operations.c.updated_at - operations.c.created_at
        cols = [operations.c.kind, operations.c.state, func.count(),
                func.coalesce(func.sum(dur), 0.0),
                *(func.sum(case((dur <= b, 1), else_=0)) for b in DURATION_BUCKETS)]
        with self.fleet.sessions() as s:
            rows = list(s.execute(select(*cols).group_by(operations.c.kind,
                                                         operations.c.state)))
        done = CounterMetricFamily("corral_operations", "operations that ended, by kind and "
                                   "outcome (succeeded, rolled_back, needs_attention)",
                                   labels=["kind", "outcome"])
        running = GaugeMetricFamily("corral_operations_running",
                                    "operations under way (running or rolling back)",
                                    labels=["kind"])
        hist = HistogramMetricFamily("corral_operation_duration_seconds",
                                     "how long ended operations took", labels=["kind"])
        per_kind: dict[str, list[float]] = {}
        live: dict[str, float] = {}
        for kind, state, count, total, *under in rows:
            if state in {str(st) for st in FINISHED}:
                done.add_metric([kind, state], float(count))
                acc = per_kind.setdefault(kind, [0.0] * (len(DURATION_BUCKETS) + 2))
                for k, n in enumerate(under):
                    acc[k] += float(n or 0)
                acc[-2] += float(count)
                acc[-1] += float(total or 0.0)
            else:
                live[kind] = live.get(kind, 0.0) + float(count)
        for kind, n in sorted(live.items()):
            running.add_metric([kind], n)
        for kind, acc in sorted(per_kind.items()):
            buckets = [(str(b), acc[k]) for k, b in enumerate(DURATION_BUCKETS)]
            buckets.append(("+Inf", acc[-2]))
            hist.add_metric([kind], buckets, acc[-1])
        yield from (done, running, hist)


def render(fleet: Fleet, extra: Sequence[Collector] = ()) -> bytes:
    """The fleet's series plus those of ``extra`` collectors (live traffic, ...)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)
