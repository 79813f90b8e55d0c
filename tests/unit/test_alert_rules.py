"""The example alert rules (contrib/prometheus) are valid and fire on the series they watch:
promtool checks them and runs their unit tests against example series."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

RULES = Path(__file__).resolve().parents[2] / "contrib" / "prometheus"


def _promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: scripts/bootstrap installs prometheus (it has promtool)"
    return found


def test_the_rules_are_valid() -> None:
    done = subprocess.run([_promtool(), "check", "rules", "corral-rules.yml"], cwd=RULES,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout


def test_the_rules_fire_on_their_series() -> None:
    done = subprocess.run([_promtool(), "test", "rules", "corral-rules.test.yml"], cwd=RULES,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
