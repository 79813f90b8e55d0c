"""Hostile names through the CLI on a real fleet (issue 10, item 4), and the roles of API tokens
as an operator meets them: a name or path that could never be valid exits 2 before anything is
sent, a read-only token reads the fleet and is refused every change (exit 3, with a hint), and
afterwards the fleet reads exactly as before: instances, images, operations, tokens, and the
hosts' disk directories."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from fleetkit import Fleet

pytestmark = pytest.mark.timeout(600)

USAGE_EXIT = 2
TOKEN_EXIT = 3
BAD_NAMES = ["a/b", "../x", "a\nb", "ünïcödé", "x" * 300, "-rf"]


def state(f: Fleet) -> dict[str, Any]:
    """What a refused command must not change (live figures left out)."""
    instances = f.json("ls")
    for i in instances:
        i.pop("usage", None)
    disks = sorted(str(p.relative_to(f.tmp)) for p in (f.tmp / "data").glob("hosts/*/disks/*"))
    return {"instances": instances, "images": f.json("image", "ls"),
            "ops": f.json("ops", "ls"), "tokens": f.json("token", "ls"),
            "shelved": f.json("shelved"), "disks": disks}


def test_hostile_names_exit_2_and_change_nothing(local_fleet: Fleet) -> None:
    f = local_fleet
    before = state(f)
    for bad in BAD_NAMES:
        for argv in (["run", bad, "--", "sleep", "1"], ["show", bad], ["stop", bad],
                     ["rm", "--force", bad], ["migrate", bad], ["shelve", bad],
                     ["run", "ok", "--host", bad, "--", "true"],
                     ["run", "ok", "--image", bad, "--", "true"],
                     ["image", "rm", bad], ["token", "create", bad], ["token", "rm", bad]):
            proc = f.cli(*argv)
            assert proc.returncode == USAGE_EXIT, (argv, proc.stdout, proc.stderr)
            assert "usage:" in proc.stderr, proc.stderr
            assert bad.startswith("-") or "not valid" in proc.stderr, proc.stderr
    for argv in (["run", "ok", "--from", "/srv/a\nb", "--", "true"],
                 ["run", "ok", "--tail", "access=logs/../../etc/shadow", "--", "true"],
                 ["run", "ok", "--tail", "access=a\nb", "--", "true"]):
        proc = f.cli(*argv)
        assert proc.returncode == USAGE_EXIT, (argv, proc.stderr)
    assert state(f) == before


def test_a_read_only_token_reads_and_changes_nothing(local_fleet: Fleet, tmp_path: Path) -> None:
    f = local_fleet
    name = f"e2e-ro-{uuid.uuid4().hex[:6]}"
    token = f.ok("token", "create", name, "--read-only").strip()
    try:
        before = state(f)
        ro = {**f.env, "CORRAL_TOKEN": token}
        listed = f.cli("ls", "--json", env=ro)
        assert listed.returncode == 0, listed.stderr
        for argv in (["run", "ro", "--", "sleep", "60"], ["image", "gc"],
                     ["token", "create", "mine"], ["token", "ls"], ["rm", "nosuch"]):
            proc = f.cli(*argv, env=ro)
            assert proc.returncode == TOKEN_EXIT, (argv, proc.stdout, proc.stderr)
            assert "read-only" in proc.stderr and "hint:" in proc.stderr, proc.stderr
        assert state(f) == before
    finally:
        f.ok("token", "rm", name)
    refused = f.cli("ls", env={**f.env, "CORRAL_TOKEN": token})
    assert refused.returncode == TOKEN_EXIT and "wrong token" in refused.stderr
