"""The /proc parsing helpers, on fixed lines and on this very machine's /proc."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from corral.drivers import procfs

# a real line (pid 42), with an awkward comm: spaces and parentheses
LINE = (
    "42 (a) b (c)) S 1 40 41 0 -1 4194560 100 0 0 0 250 30 7 3 20 0 1 0 123456 1000000 "
    "321 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
)


def test_parse_stat_takes_comm_up_to_the_last_parenthesis() -> None:
    st = procfs.parse_stat(LINE)
    assert st.pid == 42
    assert st.comm == "a) b (c)"
    assert (st.state, st.ppid, st.pgrp, st.session) == ("S", 1, 40, 41)
    assert (st.utime, st.stime, st.cutime, st.cstime) == (250, 30, 7, 3)
    assert st.starttime == 123456
    assert st.rss_pages == 321
    assert st.cpu_ticks == 290
    assert st.alive


def test_zombies_are_not_alive() -> None:
    assert not procfs.parse_stat(LINE.replace(" S 1 40", " Z 1 40")).alive


def test_short_line_is_rejected() -> None:
    with pytest.raises(ValueError):
        procfs.parse_stat("42 (x) S 1 2 3")


def test_reads_this_process() -> None:
    st = procfs.read_stat(os.getpid())
    assert st is not None
    assert st.pid == os.getpid()
    assert st.session == os.getsid(0)
    assert procfs.is_alive(st.pid, st.starttime)
    assert not procfs.is_alive(st.pid, st.starttime + 1)  # another process with our pid


def test_missing_pid_reads_as_none() -> None:
    assert procfs.read_stat(2**22 + 17) is None


def test_identify_tells_a_reaped_child_is_gone() -> None:
    child = subprocess.Popen(["sleep", "30"])
    st = procfs.read_stat(child.pid)
    assert st is not None
    child.kill()
    child.wait()
    assert not procfs.is_alive(child.pid, st.starttime)


def test_scan_and_session_usage_cover_a_new_session() -> None:
    # a shell in its own session with a child burning CPU: both count in that session
    p = subprocess.Popen(["sh", "-c", "sh -c 'while :; do :; done' & wait"],
                         start_new_session=True)
    try:
        time.sleep(0.5)
        procs = procfs.scan()
        assert any(s.pid == os.getpid() for s in procs)
        usage = procfs.usage_by_session(procs)[p.pid]
        assert len(usage.pids) == 2
        assert usage.cpu_ns > 0
        assert usage.rss_bytes > 0
        assert usage.cpu_ns == procfs.ticks_to_ns(usage.cpu_ticks)
    finally:
        os.killpg(p.pid, 9)
        p.wait()


def test_ticks_to_ns() -> None:
    assert procfs.ticks_to_ns(procfs.CLOCK_TICKS) == 1_000_000_000
