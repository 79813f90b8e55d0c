"""One sampling pass: every driver's counters at once, turned into CPU figures.

The pass is a plain synchronous function so the agent runs it in one worker thread and the
accounting bench (``bench/accounting.py``) measures exactly the same code. Its own cost is
measured too -- the CPU time of the calling thread plus any child processes the driver waited
for -- and published as ``sample_cpu_s`` so operators can see what watching costs.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from corral.bus.messages import InstanceSample, MetricsSample
from corral.drivers.base import Driver, Handle
from corral.telemetry.accounting import CpuAccountant, HostCpu


@dataclass(frozen=True)
class PassResult:
    sample: MetricsSample
    #: names asked about that no driver reported (not running any more, probably).
    missing: frozenset[str]
    #: CPU seconds of this pass: thread time plus waited-for children.
    cpu_s: float


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def sample_pass(
    drivers: Mapping[str, Driver],
    handles: Sequence[Handle],
    accountant: CpuAccountant,
    host: str,
    interval_s: float,
    clock_ns: Callable[[], int] = time.monotonic_ns,
    host_cpu: HostCpu | None = None,
) -> PassResult:
    """Read ``driver.stats`` once per driver for ``handles`` and account each instance.

    Each driver's readings share one timestamp, the middle of its ``stats`` call, so that a slow
    scan over many instances shifts every reading alike instead of skewing the rates.
    """
    t0 = time.thread_time()
    c0 = _children_cpu_s()
    by_driver: dict[str, list[Handle]] = {}
    for h in handles:
        by_driver.setdefault(h.driver, []).append(h)
    samples: list[InstanceSample] = []
    seen: set[str] = set()
    for drv_name, group in by_driver.items():
        drv = drivers.get(drv_name)
        if drv is None:
            continue
        before = clock_ns()
        stats = drv.stats(group)
        at = (before + clock_ns()) // 2
        for name, s in stats.items():
            core, host_pct = accountant.update(name, s.cpu_ns, s.generation, at)
            samples.append(
                InstanceSample(name=name, cpu_ns=s.cpu_ns, memory_bytes=s.memory_bytes,
                               generation=s.generation, cpu_core_pct=core,
                               cpu_host_pct=host_pct)
            )
            seen.add(name)
    accountant.forget_missing(seen)
    cpu_s = (time.thread_time() - t0) + max(0.0, _children_cpu_s() - c0)
    host_pct_all = host_cpu.update() if host_cpu is not None else None
    sample = MetricsSample(host=host, wall_ns=time.time_ns(), host_cores=accountant.host_cores,
                           interval_s=interval_s, instances=samples, sample_cpu_s=cpu_s,
                           host_cpu_pct=host_pct_all)
    missing = frozenset(h.name for h in handles) - seen
    return PassResult(sample=sample, missing=missing, cpu_s=cpu_s)
