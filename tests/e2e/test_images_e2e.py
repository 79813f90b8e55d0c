"""Images through the CLI on a real local fleet: import, list with dedup, rm, gc."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from fleetkit import Fleet


def tree(root: Path, shared: bytes, own: bytes) -> Path:
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "libbase.so").write_bytes(shared)
    (root / "etc").mkdir()
    (root / "etc" / "app.conf").write_bytes(own)
    os.symlink("usr/lib", root / "lib")
    return root


def test_import_ls_rm_gc(local_fleet: Fleet, tmp_path: Path) -> None:
    shared = os.urandom(2_000_000)
    a = tree(tmp_path / "a", shared, os.urandom(50_000))
    b = tree(tmp_path / "b", shared, os.urandom(50_000))
    out_a = local_fleet.ok("image", "import", "img-a", str(a))
    assert "img-a: imported" in out_a
    tarball = tmp_path / "b.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(b), "."], check=True)
    out_b = local_fleet.ok("image", "import", "img-b", str(tarball))
    # the second image shares the 2 MB library: only its own bytes travel
    sent_b = next(w for w in out_b.split(",") if "sent" in w)
    assert "M" not in sent_b.split()[0], out_b
    rows = {r["name"]: r for r in local_fleet.json("image", "ls")}
    assert set(rows) >= {"img-a", "img-b"}
    assert rows["img-a"]["size"] == 2_050_000
    assert rows["img-a"]["unique_size"] < 200_000
    again = local_fleet.cli("image", "import", "img-a", str(a))
    assert again.returncode == 5 and "exists" in again.stderr  # conflict, nothing replaced
    local_fleet.ok("image", "rm", "img-a")
    gone = local_fleet.cli("image", "rm", "img-a")
    assert gone.returncode == 4  # not found
    res = local_fleet.json("image", "gc")
    assert res["dropped"] >= 2 and res["damaged"] == []
    assert [r["name"] for r in local_fleet.json("image", "ls")] == ["img-b"]
