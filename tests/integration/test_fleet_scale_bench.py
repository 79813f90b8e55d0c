"""bench/fleet_scale.py at a toy size, so the bench does not rot: a real server, five
simulated hosts enrolled through the API, twenty instances placed one by one and thirty in a
batch; it must end with its
figure lines and report nothing wrong (every host up, every instance running where the
server put it, no reservation over capacity). Speed is the bench's business, not this test's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fleet_scale_bench_runs_at_a_toy_size() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "fleet_scale.py"), "--hosts", "5",
         "--instances", "20", "--batch", "30", "--rounds", "1", "--ls", "2", "--seconds", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")},
        start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:  # its group: the server and simulators it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, out
    figures = dict(re.findall(r"^figure: (\S+) (\S+) ", out, re.M))
    for name in ("fleet_scale.hb_p50", "fleet_scale.hb_p99", "fleet_scale.placement_rate",
                 "fleet_scale.placement_rate.baseline", "fleet_scale.placement_rate_batch",
                 "fleet_scale.ls_p99",
                 "fleet_scale.hb_cpu_per_beat.baseline"):
        assert float(figures[name]) > 0, (name, out)
    assert figures["fleet_scale.hosts"] == "5"
    assert figures["fleet_scale.instances"] == "50"  # 20 one by one, 30 in a batch
    for name in ("wrong_placements", "lease_lapses", "hosts_marked_down", "hb_unanswered"):
        assert figures[f"fleet_scale.{name}"] == "0", (name, out)
    # it removed its directory (server data, logs) on the way out
    top = re.search(r"in (/\S+corral-bench-fleet-\S+)", out)
    assert top is not None and not Path(top.group(1)).exists()
