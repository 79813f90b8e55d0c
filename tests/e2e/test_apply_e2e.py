"""``corral apply`` and ``corral export`` against a real two-host fleet (process driver)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fleetkit import Fleet, fleet_for

from corral.errors import InvalidRequest

pytestmark = pytest.mark.timeout(300)

FILE = """
[[instance]]
name = "web"
memory = "32M"
command = ["sleep", "{sleep}"]
tail = {{ app = "app.log" }}
restart = {{ mode = "on-failure" }}

[[instance]]
name = "db"
host = "host1"
cpus = 0.2
command = ["sh", "-c", "echo up > data.txt; exec sleep 600"]
standby = {{ host = "host2", every = "1h" }}
"""


def fleet_state(f: Fleet) -> dict[str, Any]:
    return {i["name"]: (i["epoch"], i["command"], i["host"], i["state"]) for i in f.json("ls")}


def planned(f: Fleet, path: Path) -> list[tuple[str, str]]:
    p = f.json("apply", "-f", str(path), "--dry-run")
    assert p["applied"] is False
    return [(c["action"], c["instance"]) for c in p["changes"]]


def test_apply_export_round_trip(tmp_path: Path) -> None:
    with fleet_for(tmp_path, "--hosts", "2") as f:
        spec = tmp_path / "fleet.toml"
        spec.write_text(FILE.format(sleep=600))
        f.ok("run", "mine", "--", "sleep", "600")  # the operator's own: never touched

        assert planned(f, spec) == [("create", "web"), ("create", "db"), ("standby-add", "db")]
        refused = f.cli("apply", "-f", str(spec))  # no terminal, no --yes: nothing done
        assert refused.returncode == InvalidRequest.exit_code, refused.stderr
        assert "--yes" in refused.stderr
        assert set(fleet_state(f)) == {"mine"}

        shown = f.ok("apply", "-f", str(spec), "--yes")
        assert "Plan: 2 to create, 1 to standby-add" in shown
        assert "left alone" in shown and "mine" in shown
        f.wait_state("web", {"running"})
        assert f.instance("db")["host"] == "host1"
        assert [(s["instance"], s["host"]) for s in f.json("standby", "ls")] == [("db", "host2")]
        assert planned(f, spec) == []  # a second apply changes nothing
        assert "No changes" in f.ok("apply", "-f", str(spec), "--yes")

        # a changed command is a recreate, shown as such, done only with --yes
        before = fleet_state(f)
        spec.write_text(FILE.format(sleep=700))
        plan = f.json("apply", "-f", str(spec), "--dry-run")
        assert [(c["action"], c["instance"], [d["field"] for d in c["changes"]])
                for c in plan["changes"]] == [("recreate", "web", ["command"])]
        assert "recreate" in f.ok("apply", "-f", str(spec), "--dry-run")
        refused = f.cli("apply", "-f", str(spec))
        assert refused.returncode == InvalidRequest.exit_code and "recreate" in refused.stderr
        assert fleet_state(f) == before
        f.ok("apply", "-f", str(spec), "--yes")
        assert f.wait_state("web", {"running"})["command"] == ["sleep", "700"]
        assert fleet_state(f)["db"] == before["db"] and fleet_state(f)["mine"] == before["mine"]
        assert planned(f, spec) == []

        # export, then apply it back: nothing to do (TOML and JSON alike)
        exported = tmp_path / "exported.toml"
        exported.write_text(f.ok("export"))
        assert planned(f, exported) == []
        as_json = tmp_path / "exported.json"
        as_json.write_text(json.dumps(f.json("export")))
        assert planned(f, as_json) == []

        # a bad file is refused before anything is asked of the fleet
        before = fleet_state(f)
        bad = tmp_path / "bad.toml"
        bad.write_text(FILE.format(sleep=800) + '\n[[instance]]\nname = "x"\ncommand = ["x"]'
                       '\nmemroy = "1G"\n')
        refused = f.cli("apply", "-f", str(bad), "--yes")
        assert refused.returncode == InvalidRequest.exit_code
        line = bad.read_text().splitlines().index('memroy = "1G"') + 1
        assert f"line {line}, instance[2].memroy: unknown key" in refused.stderr, refused.stderr
        assert fleet_state(f) == before
