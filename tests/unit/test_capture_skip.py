"""A copy whose disk came from another host starts its tailed files where they end: what they
hold was captured by the host that wrote it."""

from __future__ import annotations

from pathlib import Path

from corral.telemetry.capture import LogCapture


def _cap(tmp: Path) -> LogCapture:
    return LogCapture(tmp / "access.log", tmp / "access.json", "h2", "web", "access")


def test_what_the_file_held_is_skipped_and_what_comes_after_is_read(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("one\ntwo\n")
    assert _cap(tmp_path).skip_existing()
    with log.open("a") as fh:
        fh.write("three\n")
    batch, _ = _cap(tmp_path).read_batch()  # a new capture, from the saved offsets
    assert batch is not None and batch.lines == ["three"] and batch.first_seq == 1


def test_a_capture_that_has_offsets_keeps_them(tmp_path: Path) -> None:
    (tmp_path / "access.log").write_text("one\n")
    cap = _cap(tmp_path)
    cap._save()  # offsets at 0: what an agent that already read nothing keeps
    assert not _cap(tmp_path).skip_existing()
    batch, _ = _cap(tmp_path).read_batch()
    assert batch is not None and batch.lines == ["one"]


def test_a_file_not_there_yet_is_read_from_its_start(tmp_path: Path) -> None:
    assert not _cap(tmp_path).skip_existing()
    (tmp_path / "access.log").write_text("first\n")
    batch, _ = _cap(tmp_path).read_batch()
    assert batch is not None and batch.lines == ["first"]
