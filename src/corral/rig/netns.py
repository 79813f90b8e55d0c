"""Network namespaces as hosts: one bridge in the root namespace, one namespace per host.

Layout for tag ``T`` (6 hex digits) and subnet ``k``: bridge ``crlT`` with 10.213.k.1/24; host i
is namespace ``crl-T-h<i>`` holding ``eth0`` (a veth whose peer ``vT<i>`` is on the bridge) with
10.213.k.<10+i>/24, ``lo`` up, default route via the bridge. Everything is made with iproute2, and
:func:`cleanup` removes whatever exists of a tag, so a half-built network never survives a failure.

Agents enter their namespace with ``nsenter --net``, not ``ip netns exec``: the latter also makes a
new mount namespace with a fresh /sys, which hides /sys/fs/cgroup from the agent (and from runc).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import ConfigError, CorralError

NETNS_DIR = Path("/run/netns")
PREFIX_NET = "10.213"


@dataclass(frozen=True)
class FleetNetwork:
    tag: str
    subnet: int
    hosts: int

    @property
    def bridge(self) -> str:
        return f"crl{self.tag}"

    @property
    def gateway(self) -> str:
        return f"{PREFIX_NET}.{self.subnet}.1"

    def namespace(self, i: int) -> str:
        return f"crl-{self.tag}-h{i}"

    def address(self, i: int) -> str:
        return f"{PREFIX_NET}.{self.subnet}.{10 + i}"

    def veth(self, i: int) -> str:
        return f"v{self.tag}{i}"

    @property
    def namespaces(self) -> list[str]:
        return [self.namespace(i) for i in range(1, self.hosts + 1)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "subnet": self.subnet,
            "hosts": self.hosts,
            "bridge": self.bridge,
            "gateway": self.gateway,
            "namespaces": self.namespaces,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FleetNetwork:
        return cls(tag=str(raw["tag"]), subnet=int(raw["subnet"]), hosts=int(raw["hosts"]))


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one iproute2 command; failures become errors carrying ip's own words."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise CorralError(
            f"'ip {' '.join(args)}' failed: {proc.stderr.strip() or proc.stdout.strip()}",
            hint="check that iproute2 is installed and that you are root",
        )
    return proc


def require_root() -> None:
    if os.geteuid() != 0:
        raise ConfigError(
            "--netns needs root: it creates network namespaces and a bridge",
            hint="run 'sudo corral up --netns', or drop --netns for an unprivileged fleet",
        )


def used_subnets() -> set[int]:
    """Third octets of 10.213.x.y addresses already on this machine's root namespace."""
    out = ip("-4", "-o", "addr", "show", check=False).stdout
    pattern = re.escape(PREFIX_NET) + r"\.(\d+)\."
    return {int(m) for m in re.findall(pattern, out)}


def pick_subnet() -> int:
    used = used_subnets()
    for k in range(1, 255):
        if k not in used:
            return k
    raise CorralError(f"no free {PREFIX_NET}.x.0/24 subnet left",
                      hint="remove old fleets with 'corral down' or clean up crl* bridges")


def create(hosts: int, tag: str | None = None) -> FleetNetwork:
    """Build the bridge and ``hosts`` namespaces; on any failure remove what was built."""
    require_root()
    net = FleetNetwork(tag=tag or secrets.token_hex(3), subnet=pick_subnet(), hosts=hosts)
    try:
        ip("link", "add", net.bridge, "type", "bridge")
        ip("addr", "add", f"{net.gateway}/24", "dev", net.bridge)
        ip("link", "set", net.bridge, "up")
        for i in range(1, hosts + 1):
            _add_host(net, i)
    except BaseException:
        cleanup(net)
        raise
    return net


def _add_host(net: FleetNetwork, i: int) -> None:
    ns, outer, inner = net.namespace(i), net.veth(i), f"p{net.tag}{i}"
    ip("netns", "add", ns)
    ip("link", "add", outer, "type", "veth", "peer", "name", inner)
    ip("link", "set", outer, "master", net.bridge)
    ip("link", "set", outer, "up")
    ip("link", "set", inner, "netns", ns)
    ip("-n", ns, "link", "set", inner, "name", "eth0")
    ip("-n", ns, "addr", "add", f"{net.address(i)}/24", "dev", "eth0")
    ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "route", "add", "default", "via", net.gateway)


def cleanup(net: FleetNetwork | str) -> list[str]:
    """Remove every namespace and link of a tag (given a network or a tag); never raises.

    Returns what could not be removed, so callers can tell the operator.
    """
    tag = net.tag if isinstance(net, FleetNetwork) else net
    if not re.fullmatch(r"[0-9a-f]{6}", tag):
        return [f"refusing to clean up a malformed tag {tag!r}"]
    left: list[str] = []
    for ns in namespaces_of(tag):
        if ip("netns", "del", ns, check=False).returncode != 0 and (NETNS_DIR / ns).exists():
            left.append(ns)
    links = ip("-o", "link", "show", check=False).stdout
    for name in re.findall(rf"^\d+: ((?:crl|v){tag}\d*)[@:]", links, flags=re.MULTILINE):
        if ip("link", "del", name, check=False).returncode != 0 and link_exists(name):
            left.append(name)
    return left


def namespaces_of(tag: str) -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(f"crl-{tag}-h"))


def link_exists(name: str) -> bool:
    return ip("link", "show", name, check=False).returncode == 0


def enter_argv(ns: str) -> list[str]:
    """Prefix that runs a command in namespace ``ns``'s network only (see module docstring)."""
    return ["nsenter", f"--net={NETNS_DIR / ns}", "--"]

