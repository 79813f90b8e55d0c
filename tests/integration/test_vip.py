"""A virtual IP moves from a dead host to a live one and a client reaches it again at once
(real network namespaces on a bridge, real ARP)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 not installed"),
]

SERVE = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000)); s.listen(16)
while True:
    c, _ = s.accept(); c.sendall(sys.argv[1].encode()); c.close()
"""

ASK = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], 7000), timeout=float(sys.argv[2]))
    print(c.recv(64).decode())
except OSError as e:
    print("ERR", e)
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *argv]


@pytest.fixture
def segment() -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:5]
    br = f"crlv{tag}"
    names = {"a": f"crlv-{tag}-a", "b": f"crlv-{tag}-b", "c": f"crlv-{tag}-c"}
    made: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sh("ip", "link", "add", br, "type", "bridge")
        sh("ip", "link", "set", br, "up")
        for i, (key, ns) in enumerate(names.items(), start=1):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "link", "add", f"v{tag}{key}", "type", "veth", "peer", "name", f"p{tag}{key}")
            sh("ip", "link", "set", f"v{tag}{key}", "master", br, "up")
            sh("ip", "link", "set", f"p{tag}{key}", "netns", ns)
            sh(*in_ns(ns, "ip", "link", "set", f"p{tag}{key}", "name", "eth0"))
            sh(*in_ns(ns, "ip", "addr", "add", f"10.214.77.{10 + i}/24", "dev", "eth0"))
            sh(*in_ns(ns, "ip", "link", "set", "eth0", "up"))
            sh(*in_ns(ns, "ip", "link", "set", "lo", "up"))
        for key in ("a", "b"):
            procs.append(subprocess.Popen(in_ns(names[key], sys.executable, "-c", SERVE, key)))
        time.sleep(0.5)
        yield names
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", br], capture_output=True)


def ask(ns: str, ip: str, timeout: float = 1.0) -> str:
    out = subprocess.run(in_ns(ns, sys.executable, "-c", ASK, ip, str(timeout)),
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def vip(ns: str, op: str, addr: str) -> None:
    code = f"from corral.ha import vip; vip.{op}('eth0', '{addr}')"
    subprocess.run(in_ns(ns, sys.executable, "-c", code), check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")})


def test_vip_moves_and_client_follows_at_once(segment: dict[str, str]) -> None:
    addr = "10.214.77.50/24"
    vip(segment["a"], "add", addr)
    assert ask(segment["c"], "10.214.77.50") == "a"  # the client now caches a's MAC
    # host a dies: its link goes down without it saying anything
    sh(*in_ns(segment["a"], "ip", "link", "set", "eth0", "down"))
    # the kernel ignores a new MAC for an entry younger than neigh locktime (1 s); a real
    # failover comes a lease (10 s) after the last answer, so wait that second here too
    time.sleep(1.2)
    vip(segment["b"], "add", addr)
    start = time.monotonic()
    answer = ask(segment["c"], "10.214.77.50", timeout=2.0)
    assert answer == "b", answer
    assert time.monotonic() - start < 3.0  # not after an ARP cache expiry
    # and removing is idempotent (an undo may run twice)
    vip(segment["b"], "remove", addr)
    vip(segment["b"], "remove", addr)
