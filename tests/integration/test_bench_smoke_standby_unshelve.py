"""bench/standby.py and bench/unshelve.py at toy size: each runs to its end through a real
local fleet, every copy it makes passes its tree check (a copy that differs ends the bench with
an error), and it prints its figure lines. Speed is the benches' business, not this test's.

Also the shared pieces on their own: the tree compare notices what a bad copy gets wrong, and
the rate-limiting proxy forwards bytes unchanged in both directions.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from rateproxy import RateProxy  # noqa: E402
from treecmp import compare, manifest, tree_hash  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the benches need root")
needs_rsync = pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")


def bench(script: str, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def figures(out: str) -> dict[str, float]:
    found = {}
    for line in out.splitlines():
        if line.startswith("figure: "):
            name, value, _unit = line.removeprefix("figure: ").split()
            found[name] = float(value)
    return found


@needs_root
@needs_rsync
@pytest.mark.root
@pytest.mark.timeout(120)
def test_standby_bench_runs_tiny_and_checks_its_copies() -> None:
    out = bench("standby.py", "--size-mb", "2", "--files", "200", "--rounds", "1")
    assert "every copy checked equal to the source" in out
    fig = figures(out)
    for name in ("standby.initial_s", "standby.rsync_initial_s", "standby.corral_refresh_s",
                 "standby.rsync_refresh_s", "standby.corral_freeze_ms"):
        assert name in fig, out
    # a refresh after a 1 % change moves far less than the whole 2 MB tree, both ways
    assert 0 < fig["standby.corral_refresh_mb"] < 1.5, out
    assert 0 < fig["standby.rsync_refresh_mb"] < 1.5, out
    assert fig["standby.corral_freeze_ms"] > 0, out


@needs_root
@needs_rsync
@pytest.mark.root
@pytest.mark.skipif(shutil.which("iptables") is None, reason="needs iptables")
@pytest.mark.timeout(120)
def test_unshelve_bench_runs_tiny_and_checks_its_trees() -> None:
    out = bench("unshelve.py", "--instances", "2", "--base-mb", "2", "--own-kb", "32",
                "--rounds", "1", "--parallel", "2", "--warm", "--rate-mbit", "400")
    assert "every unshelved tree checked against the original" in out
    fig = figures(out)
    for name in ("unshelve.corral_s_400mbit", "unshelve.corral_s_400mbit.baseline",
                 "unshelve.corral_mb.baseline", "unshelve.shelve_s_400mbit"):
        assert name in fig, out
    assert fig["unshelve.corral_mb.baseline"] > 1.0, out  # two whole disks came back
    # the rule that sent the agents through the proxy is gone
    rules = subprocess.run(["iptables", "-t", "nat", "-S", "OUTPUT"], capture_output=True,
                           text=True).stdout
    assert "corral-bench-rateproxy" not in rules


def spoil(copy: Path, what: str) -> None:
    if what == "content":
        (copy / "x").write_bytes(b"y" * 100)
    elif what == "mode":
        (copy / "a" / "f").chmod(0o700)
    elif what == "missing":
        (copy / "x").unlink()
    elif what == "extra":
        (copy / "new").write_bytes(b"")
    else:
        (copy / "a" / "l").unlink()
        (copy / "a" / "l").symlink_to("x")


def test_tree_compare_sees_what_a_bad_copy_gets_wrong(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"hello")
    (src / "a" / "l").symlink_to("f")
    (src / "x").write_bytes(b"x" * 100)
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, symlinks=True)
    assert compare(src, copy, "exact") == len(manifest(src))
    assert tree_hash(src) == tree_hash(copy)
    for what in ("content", "mode", "missing", "extra", "link"):
        shutil.rmtree(copy)
        shutil.copytree(src, copy, symlinks=True)
        spoil(copy, what)
        with pytest.raises(AssertionError):
            compare(src, copy, what)
        assert tree_hash(src) != tree_hash(copy), what


#: every byte inverted: a transform that does not depend on how TCP splits the stream
FLIP = bytes(b ^ 0xFF for b in range(256))


@pytest.fixture
def echo_server() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            while data := conn.recv(65536):
                conn.sendall(data.translate(FLIP))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()
        t.join(10)


def test_rate_proxy_forwards_both_ways_unchanged(echo_server: int) -> None:
    payload = os.urandom(300_000)
    with RateProxy(("127.0.0.1", echo_server), 400e6) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        got = b""
        for k in range(0, len(payload), 50_000):
            piece = payload[k:k + 50_000]
            s.sendall(piece)
            want = len(got) + len(piece)
            while len(got) < want:
                data = s.recv(65536)
                assert data, "the proxy closed the connection"
                got += data
        assert got == payload.translate(FLIP)
    assert proxy.moved == [len(payload), len(payload)]
