"""What crosses the wire between a fleet's processes carries no secret and no workload data.

tcpdump records every TCP segment on loopback while ``corral up`` enrolls its hosts and an
instance writes a file, logs a line and migrates (its disk crosses the data channel); then the
capture is searched for the admin token, each host's join token, API token and bus key seed,
the file's contents and the log line. All of it travels over TLS, so none may appear. The
capture must also hold at least as many bytes as the file, so a capture that missed the
migration cannot pass.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fleetkit import fleet_for

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="capturing on loopback needs root"),
]

FILE_BYTES = 256 * 1024


def _secrets_of(data: Path) -> dict[str, str]:
    """The fleet's secrets as they are on disk: the admin token and each host's identity."""
    found = {"admin token": (data / "token").read_text().strip()}
    for ident in sorted((data / "hosts").glob("*/identity")):
        host = ident.parent.name
        found[f"{host} bus key seed"] = (ident / "host.nk").read_text().strip()
        api = json.loads((ident / "identity.json").read_text()).get("api_token")
        if api:
            found[f"{host} API token"] = str(api)
    return found


def _join_tokens(pids: list[int]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pid in pids:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for kv in env:
            if kv.startswith(b"CORRAL_JOIN_TOKEN="):
                out[f"join token of pid {pid}"] = kv.split(b"=", 1)[1].decode()
    return out


def test_nothing_secret_or_private_crosses_loopback_in_clear(tmp_path: Path) -> None:
    tcpdump = shutil.which("tcpdump")
    assert tcpdump, "tcpdump is missing: scripts/bootstrap installs it"
    pcap = tmp_path / "lo.pcap"
    cap = subprocess.Popen([tcpdump, "-i", "lo", "-s", "0", "-U", "-Z", "root", "-w",
                            str(pcap), "tcp"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not pcap.exists() and cap.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cap.poll() is None, cap.stderr.read().decode() if cap.stderr else ""
        with fleet_for(tmp_path, "--hosts", "2") as f:
            assert f.ctx is not None
            join_tokens = _join_tokens([a.pid for a in f.ctx.agents])
            log_line = f"log-{secrets.token_hex(12)}"
            # the file's bytes are made by the workload, so they appear nowhere else
            f.ok("run", "private", "--", "sh", "-c",
                 f"head -c {FILE_BYTES // 2} /dev/urandom | od -An -tx1 | tr -d ' \\n' "
                 f"> data.txt; echo {log_line}; exec sleep 600")
            src = f.wait_state("private", {"running"})["host"]
            disk = Path(f.ctx.data_dir or "") / "hosts" / src / "disks" / "private"
            deadline = time.monotonic() + 30
            while (not (disk / "data.txt").exists()
                   or (disk / "data.txt").stat().st_size < FILE_BYTES):
                assert time.monotonic() < deadline, "the workload did not write its file"
                time.sleep(0.1)
            content = (disk / "data.txt").read_text()
            deadline = time.monotonic() + 30
            while log_line not in f.ok("logs", "private"):
                assert time.monotonic() < deadline, "the log line did not arrive"
                time.sleep(0.3)
            f.ok("migrate", "private")
            moved = f.instance("private")
            assert moved["host"] != src and moved["state"] == "running"
            private = {**_secrets_of(Path(f.ctx.data_dir or "")), **join_tokens,
                       "a slice of the workload's file": content[1000:1064],
                       "the workload's log line": log_line}
            assert len(join_tokens) == 2, "each agent enrolled with a join token"
    finally:
        os.killpg(cap.pid, signal.SIGINT)
        try:
            cap.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(cap.pid, signal.SIGKILL)
            cap.wait(10)
    wire = pcap.read_bytes()
    assert len(wire) > FILE_BYTES, f"only {len(wire)} bytes captured: the capture missed work"
    leaked = [what for what, value in private.items() if value and value.encode() in wire]
    assert leaked == [], f"seen in clear on loopback: {leaked}"
