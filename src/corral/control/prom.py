"""``/metrics``: the fleet's current state in Prometheus text format.

A custom collector reads the database and the latest samples at scrape time instead of keeping
gauges up to date on every heartbeat: there is one source of truth, and an instance that was
removed simply stops appearing (no stale series to forget).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select

from corral.control.db import Host, Instance
from corral.control.fleet import Fleet
from corral.control.views import host_view, instance_usage

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
        for i in instances:
            lv = [i.name, i.host or "", i.driver]
            ires_c.add_metric(lv, i.cpus)
            state.add_metric([*lv, i.state], 1.0)
            u = instance_usage(self.fleet, i)
            if u.cpu_core_pct is not None:
                core.add_metric(lv, u.cpu_core_pct)
            if u.cpu_host_pct is not None:
                hpct.add_metric(lv, u.cpu_host_pct)
            if u.memory_bytes is not None:
                mem.add_metric(lv, float(u.memory_bytes))
        yield from (core, hpct, mem, ires_c, state)

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
        yield from (up, cpu, rest, cores, rc, rm)


def render(fleet: Fleet, extra: Sequence[Collector] = ()) -> bytes:
    """The fleet's series plus those of ``extra`` collectors (live traffic, ...)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)
