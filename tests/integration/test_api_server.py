"""``serve()`` as its own process: ready file, SIGTERM, clean exit, its nats-server gone too."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}")
        if path.exists():
            return dict(json.loads(path.read_text()))
        time.sleep(0.05)
    raise AssertionError("server.json never appeared")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not "alive" for our purposes
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _spawn(data: Path, **env: str) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    full.update({"CORRAL_DATA_DIR": str(data), "CORRAL_API_PORT": "0", **env})
    return subprocess.Popen([sys.executable, "-m", "corral.control"], env=full,
                            stdout=subprocess.DEVNULL, stderr=(data / "server.err").open("wb"))


def test_serve_runs_until_sigterm_and_cleans_up(tmp_path: Path) -> None:
    proc = _spawn(tmp_path)
    try:
        info = _wait_file(tmp_path / "server.json", proc)
        token = (tmp_path / "token").read_text().strip()
        assert oct((tmp_path / "token").stat().st_mode & 0o777) == "0o600"
        assert info["pid"] == proc.pid and info["token_file"] == str(tmp_path / "token")
        assert httpx.get(f"{info['api_url']}/healthz").status_code == 200
        r = httpx.get(f"{info['api_url']}/v1/status",
                      headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["nats_url"] == info["nats_url"]
        nats_pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                     and _cmdline_has(p, str(tmp_path / "nats"))]
        assert len(nats_pids) == 1
        assert token not in (Path(f"/proc/{nats_pids[0]}/cmdline").read_bytes().decode())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not (tmp_path / "server.json").exists()
        deadline = time.monotonic() + 10
        while _pid_alive(nats_pids[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _pid_alive(nats_pids[0])
        assert (tmp_path / "corral.db").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _cmdline_has(p: Path, needle: str) -> bool:
    try:
        return needle in (p / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _spawn(tmp_path, CORRAL_API_PORT=str(port))
        try:
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert code != 0
    err = (tmp_path / "server.err").read_text()
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert not (tmp_path / "server.json").exists()


@pytest.mark.parametrize("bad", ["sqlite+nodriver:///x", "not a url"])
def test_a_bad_db_url_is_a_config_error(tmp_path: Path, bad: str) -> None:
    proc = _spawn(tmp_path, CORRAL_DB_URL=bad)
    try:
        assert proc.wait(30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    err = (tmp_path / "server.err").read_text()
    assert "db_url" in err or "database" in err
    assert not (tmp_path / "server.json").exists()


def test_a_server_killed_with_9_takes_its_nats_server_along(tmp_path: Path) -> None:
    proc = _spawn(tmp_path)
    try:
        _wait_file(tmp_path / "server.json", proc)
        nats_pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                     and _cmdline_has(p, str(tmp_path / "nats"))]
        assert len(nats_pids) == 1
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 15
    while _pid_alive(nats_pids[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _pid_alive(nats_pids[0])
    if alive:
        os.kill(nats_pids[0], signal.SIGKILL)
    assert not alive
