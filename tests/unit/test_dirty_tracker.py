"""inotify dirty list: catches every kind of change, and says when it cannot."""

from __future__ import annotations

import os
import time
from pathlib import Path

from corral.disks.dirty import DirtyTracker


def settle(tr: DirtyTracker) -> None:
    time.sleep(0.05)
    tr.drain()


def test_changes_are_listed_and_reset(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "a").write_text("1")
    (tmp_path / "etc" / "b").write_text("1")
    (tmp_path / "keep").write_text("same")
    tr = DirtyTracker(tmp_path)
    tr.start()
    try:
        (tmp_path / "etc" / "a").write_text("2")  # modify
        (tmp_path / "etc" / "b").unlink()  # delete
        (tmp_path / "new").write_text("n")  # create
        os.chmod(tmp_path / "keep", 0o600)  # attrib
        os.rename(tmp_path / "new", tmp_path / "renamed")  # file rename
        (tmp_path / "var" / "lib").mkdir(parents=True)  # nested new dirs with content
        (tmp_path / "var" / "lib" / "db").write_text("x")
        settle(tr)
        got = tr.take()
        assert not got.overflowed
        assert {"etc/a", "etc/b", "new", "renamed", "keep", "var"} <= got.paths
        assert "var/lib/db" in got.paths or "var/lib" in got.paths
        # the next list starts empty and sees only later changes
        (tmp_path / "var" / "lib" / "db").write_text("y")
        settle(tr)
        again = tr.take()
        assert again.paths == {"var/lib/db"}
    finally:
        tr.stop()


def test_directory_rename_forces_full_pass(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    tr = DirtyTracker(tmp_path)
    tr.start()
    try:
        os.rename(tmp_path / "d", tmp_path / "e")
        settle(tr)
        got = tr.take()
        assert got.overflowed and "renamed" in got.reason
        assert not tr.take().overflowed
    finally:
        tr.stop()


def test_too_many_paths_overflows(tmp_path: Path) -> None:
    tr = DirtyTracker(tmp_path, max_paths=10)
    tr.start()
    try:
        for i in range(20):
            (tmp_path / f"f{i}").write_text("x")
        settle(tr)
        assert tr.take().overflowed
    finally:
        tr.stop()


def test_a_directory_made_while_a_new_one_is_being_watched_is_not_lost(
        tmp_path: Path) -> None:
    """A workload makes ``var/`` and at once ``var/lib/db``: the tracker watches ``var`` when
    it hears of it, and what is made in it before that watch exists must still be listed
    (here: made just as the watch is being added, the worst moment)."""
    tr = DirtyTracker(tmp_path)
    tr.start()
    real = tr._ino.add_watch

    def racing(path: str, mask: int) -> int:
        if path == str(tmp_path / "var") and not (tmp_path / "var" / "lib").exists():
            (tmp_path / "var" / "lib").mkdir()
            (tmp_path / "var" / "lib" / "db").write_text("x")
        return real(path, mask)

    tr._ino.add_watch = racing  # type: ignore[method-assign]
    try:
        (tmp_path / "var").mkdir()
        settle(tr)
        got = tr.take()
        assert {"var", "var/lib", "var/lib/db"} <= got.paths, got.paths
        (tmp_path / "var" / "lib" / "db").write_text("y")  # and var/lib is watched
        settle(tr)
        assert tr.take().paths == {"var/lib/db"}
    finally:
        tr.stop()
