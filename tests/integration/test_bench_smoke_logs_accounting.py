"""The log-shipping and accounting benches at toy size, end to end: they start their fleets
(and rsyslogd), check what they measure, print their figure lines and leave nothing behind.

Only correctness is asserted (nothing lost, every collector had figures); speed lives in the
benches themselves."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURE = re.compile(r"^figure: (\S+) (\S+) (\S+)$", re.M)


def run_bench(script: str, *args: str, timeout: float = 150) -> str:
    """The bench's output; on a timeout it gets SIGTERM (it then removes its fleet)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"{script} did not finish within {timeout} s:\n{out}")
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{out}"
    return out


def figures(out: str) -> dict[str, float]:
    return {name: float(value) for name, value, _ in FIGURE.findall(out)}


def _no_leftovers(tag: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if tag in line and "pytest" not in line]


def test_logs_bench_tiny() -> None:
    ways = "tcp" if shutil.which("rsyslogd") or Path("/usr/sbin/rsyslogd").exists() else ""
    out = run_bench("logs.py", "--lines", "300", "--rounds", "1", "--rate", "200",
                    "--paced-seconds", "1", "--baselines", ways)
    got = figures(out)
    assert got["logs.lost"] == 0, out
    assert got["logs.lines_per_s"] > 0 and math.isfinite(got["logs.p99_ms"]), out
    if ways:
        assert got["logs.lost.baseline_tcp"] == 0, out
        assert got["logs.lines_per_s.baseline_tcp"] > 0, out
    assert not _no_leftovers("corral-bench-logs-"), "the bench left processes behind"


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the process driver's cgroups need root here")
def test_accounting_bench_tiny() -> None:
    out = run_bench("accounting.py", "--driver", "process", "--instances", "2", "--burners",
                    "1", "--window", "3", "--rounds", "1")
    got = figures(out)
    for name in ("accounting.cpu_error", "accounting.cpu_error.baseline",
                 "accounting.memory_error", "accounting.memory_error.baseline",
                 "accounting.cost_n2", "accounting.cost_n2.baseline"):
        assert name in got and math.isfinite(got[name]), f"{name} missing or NaN:\n{out}"
    assert not _no_leftovers("corral-bench-acct-"), "the bench left processes behind"
