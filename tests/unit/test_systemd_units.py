"""The systemd units shipped in the package (issue 14): they pass ``systemd-analyze verify``,
the wheel carries them, ``corral systemd print`` writes them, and the agent's unit keeps what
stopping the agent must not stop (its workloads' shims, the fence keeper)."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from corral import systemd
from corral.cli.main import run_cli

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(systemd.__file__).parent
#: the corral executable of the interpreter running the tests (.venv/bin/corral)
CORRAL = Path(sys.executable).parent / "corral"


def directives(text: str) -> dict[str, list[str]]:
    """``Key`` -> its values, in order (a unit may repeat a key); comments and sections out."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_package_ships_every_unit_and_the_wheel_takes_them() -> None:
    assert sorted(p.name for p in PACKAGE.glob("*.service")) == sorted(systemd.UNITS)
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = meta["tool"]["setuptools"]["package-data"]["corral"]
    for unit in systemd.UNITS:
        assert any(fnmatch.fnmatch(f"systemd/{unit}", p) for p in patterns), unit


@pytest.mark.parametrize("unit", systemd.UNITS)
def test_systemd_analyze_verifies_the_unit(unit: str, tmp_path: Path) -> None:
    """``verify`` checks that ExecStart's binary exists, so the copy runs this virtualenv's
    corral; an unknown or misspelt key is only a warning (exit 0), so stderr must not name
    the unit either."""
    analyze = shutil.which("systemd-analyze") or shutil.which(
        "systemd-analyze", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package)")
    if not CORRAL.is_file():
        pytest.skip(f"no corral executable at {CORRAL} (install the package into the venv)")
    path = tmp_path / unit
    path.write_text(systemd.unit_text(unit, str(CORRAL)))
    assert f"ExecStart={CORRAL} " in path.read_text()
    r = subprocess.run([analyze, "verify", "--man=no", str(path)], capture_output=True,
                       text=True, timeout=120)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if unit in line]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


def test_verify_would_catch_a_misspelt_key(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt key shows up in what it reads."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None or not CORRAL.is_file():
        pytest.skip("systemd-analyze or the venv's corral is missing")
    path = tmp_path / "corral-agent.service"
    path.write_text(systemd.unit_text("corral-agent", str(CORRAL))
                    .replace("KillMode=process", "KillMod=process"))
    r = subprocess.run([analyze, "verify", "--man=no", str(path)], capture_output=True,
                       text=True, timeout=120)
    assert "KillMod" in r.stdout + r.stderr


def test_the_agent_unit_leaves_workloads_and_keeper_running() -> None:
    """KillMode=process: a stop or restart of the agent signals the agent alone, not the
    fence keeper it started nor the runc/qemu shims in its cgroup; and no sandboxing that
    the workloads would inherit."""
    d = directives(systemd.unit_text("corral-agent"))
    assert d["KillMode"] == ["process"]
    assert d["Restart"] == ["always"]
    assert d["ExecStart"] == [f"{systemd.DEFAULT_BIN} agent"]
    assert "User" not in d  # root: runc, cgroups, addresses, mounts
    inherited = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                 "NoNewPrivileges", "CapabilityBoundingSet", "ReadOnlyPaths", "ReadWritePaths",
                 "MountFlags", "RestrictNamespaces", "SystemCallFilter", "OOMScoreAdjust",
                 "LimitNOFILE"}
    assert not inherited & set(d)


def test_the_server_unit_is_sandboxed_and_restarts() -> None:
    d = directives(systemd.unit_text("corral-server"))
    assert d["Restart"] == ["always"]
    assert d["ExecStart"] == [f"{systemd.DEFAULT_BIN} server"]
    assert d["User"] == ["corral"] and d["ProtectSystem"] == ["strict"]
    # ProtectSystem=strict leaves it only the state directory, which is its data directory
    assert d["StateDirectory"] == ["corral"]
    assert d["Environment"] == ["CORRAL_DATA_DIR=/var/lib/corral"]
    assert d.get("KillMode", ["control-group"]) == ["control-group"]  # nats-server goes too


@pytest.mark.parametrize("unit", systemd.UNITS)
def test_no_watchdog_where_nothing_notifies(unit: str) -> None:
    """Neither process calls sd_notify: Type=notify would never finish starting, and
    WatchdogSec= would kill a healthy process."""
    d = directives(systemd.unit_text(unit))
    assert d["Type"] == ["exec"]
    assert "WatchdogSec" not in d and "NotifyAccess" not in d


def test_corral_systemd_print(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["systemd", "print"]) == 0
    assert capsys.readouterr().out.split() == list(systemd.UNITS)
    assert run_cli(["systemd", "print", "corral-agent.service"]) == 0
    assert capsys.readouterr().out == (PACKAGE / "corral-agent.service").read_text()
    assert run_cli(["systemd", "print", "corral-server", "--bin", "/opt/corral/bin/corral"]) == 0
    out = capsys.readouterr().out
    assert "ExecStart=/opt/corral/bin/corral server\n" in out
    assert systemd.DEFAULT_BIN not in out
    assert run_cli(["systemd", "print", "corral-keeper"]) == 2
    err = capsys.readouterr().err
    assert "corral ships no unit 'corral-keeper'" in err and "corral-agent.service" in err
