"""A reload is applied once nats-server has logged one "Reloaded" line per SIGHUP sent: a late
line of an earlier reload that timed out is not taken for this one's (logic only; the real
server's group commit is in tests/integration/test_bus_reload_coalesce.py)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from corral.bus.embedded import RELOADED, EmbeddedNats


class _Server:
    """Stands in for the nats-server process: logs a reload per SIGHUP when ``answers``."""

    def __init__(self, log: Path, answers: bool) -> None:
        self.log, self.answers, self.hups = log, answers, 0

    def poll(self) -> int | None:
        return None

    def send_signal(self, sig: int) -> None:
        assert sig == signal.SIGHUP
        self.hups += 1
        if self.answers:
            with self.log.open("ab") as fh:
                fh.write(b"[1] [INF] " + RELOADED + b"\n")


def _server(tmp_path: Path, answers: bool) -> tuple[EmbeddedNats, _Server]:
    nats = EmbeddedNats(tmp_path / "n", "token")
    (nats.data_dir / "nats").mkdir(parents=True)
    nats.log_path.write_bytes(b"[1] [INF] Server is ready\n")
    proc = _Server(nats.log_path, answers)
    nats.proc = proc  # type: ignore[assignment]
    nats._scan_at = nats.log_path.stat().st_size
    return nats, proc


def test_each_sighup_is_answered_by_its_own_line(tmp_path: Path) -> None:
    nats, proc = _server(tmp_path, answers=True)
    assert nats.reload(timeout=1) and nats.reload(timeout=1)
    assert proc.hups == 2 and nats.reloads == 2


def test_a_late_line_of_a_timed_out_reload_is_not_taken_for_the_next(tmp_path: Path) -> None:
    nats, proc = _server(tmp_path, answers=False)
    assert not nats.reload(timeout=0.2)  # its line never came (yet)

    def late_line() -> None:  # the first reload's line, while the second one waits
        with nats.log_path.open("ab") as fh:
            fh.write(b"[1] [INF] " + RELOADED + b"\n")

    timer = threading.Timer(0.1, late_line)
    timer.start()
    try:
        # the late line settles the first SIGHUP; nothing answers the second
        assert not nats.reload(timeout=0.5)
    finally:
        timer.cancel()
    assert proc.hups == 2


def test_a_half_written_line_is_counted_once_it_is_whole(tmp_path: Path) -> None:
    nats, _ = _server(tmp_path, answers=False)
    nats._hups = 1
    with nats.log_path.open("ab") as fh:
        fh.write(b"[1] [INF] " + RELOADED[:8])
    assert not nats._caught_up(0)
    with nats.log_path.open("ab") as fh:
        fh.write(RELOADED[8:] + b"\n")
    assert nats._caught_up(0)
