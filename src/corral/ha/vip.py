"""Virtual IPs that move with an instance: add the address on the new host, announce it.

Peers cache the MAC address behind an IP; after a failover they would keep sending to the dead
host until their ARP entry expires (minutes). A gratuitous ARP (an unsolicited reply saying
"VIP is at my MAC") makes every peer on the segment update at once, which is how keepalived and
the peer-based HA of USERS.md §5 move an address. The ARP frame is built here (a raw AF_PACKET
socket, no extra package); the address itself is added with iproute2.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time

from corral.api.addresses import parse_vip
from corral.errors import DriverError

ETH_P_ARP = 0x0806


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DriverError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}",
                          hint="virtual IPs need root and iproute2 on the host")


def has(ifname: str, vip: str) -> bool:
    iface = parse(vip)
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", ifname],
                         capture_output=True, text=True).stdout
    return f" {iface.ip}/" in out


def add(ifname: str, vip: str, announce: int = 3) -> None:
    """Add the address (idempotent) and send gratuitous ARPs for it."""
    iface = parse(vip)
    if not has(ifname, vip):
        _ip("addr", "add", str(iface), "dev", ifname)
    for i in range(max(1, announce)):
        if i:
            time.sleep(0.1)  # a peer that dropped one frame gets the next
        gratuitous_arp(ifname, str(iface.ip))


def remove(ifname: str, vip: str) -> None:
    """Remove the address if present (idempotent: an undo step may run twice)."""
    if has(ifname, vip):
        _ip("addr", "del", str(parse(vip)), "dev", ifname)


def proxied(ifname: str) -> set[str]:
    """Addresses ``ifname`` answers ARP for on another's behalf (VMs' routed VIPs)."""
    out = subprocess.run(["ip", "-4", "neigh", "show", "proxy", "dev", ifname],
                         capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def _sysctl(path: str, value: str) -> None:
    try:
        with open(f"/proc/sys/net/{path}", "w") as fh:
            fh.write(value)
    except OSError as exc:
        raise DriverError(f"cannot set net.{path.replace('/', '.')} = {value}: {exc}",
                          hint="routing a VM's virtual IP needs root") from exc


def add_routed(ifname: str, vip: str, announce: int = 3) -> None:
    """Answer ARP for ``vip`` on ``ifname`` and forward what comes for it (the kernel routes
    it on to the VM's tap, where the driver put a route): the address lives in the guest, so
    its TCP connections move with the guest's memory. Forwarding is enabled on ``ifname``
    only, and proxy replies are sent at once (the kernel's default delays them up to 0.8 s)."""
    ip = str(parse(vip).ip)
    _sysctl(f"ipv4/conf/{ifname}/forwarding", "1")
    _sysctl(f"ipv4/neigh/{ifname}/proxy_delay", "0")
    _ip("neigh", "replace", "proxy", ip, "dev", ifname)
    for i in range(max(1, announce)):
        if i:
            time.sleep(0.1)
        gratuitous_arp(ifname, ip)


def remove_routed(ifname: str, vip: str) -> None:
    ip = str(parse(vip).ip)
    if ip in proxied(ifname):
        _ip("neigh", "del", "proxy", ip, "dev", ifname)


SIOCGIFHWADDR = 0x8927


def mac_of(ifname: str) -> bytes:
    """The interface's MAC, asked of the kernel in *this* network namespace (sysfs may show
    another namespace's interfaces when the process entered with ``nsenter --net``)."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        info = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("256s", ifname.encode()[:15]))
    return info[18:24]


def gratuitous_arp(ifname: str, ip: str) -> None:
    """Broadcast an ARP reply ``ip is-at <our mac>`` on ``ifname``."""
    mac = mac_of(ifname)
    addr = socket.inet_aton(ip)
    broadcast = b"\xff" * 6
    frame = (
        broadcast + mac + struct.pack("!H", ETH_P_ARP)
        + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)  # Ethernet, IPv4, reply
        + mac + addr + broadcast + addr
    )
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((ifname, 0))
        s.send(frame)


#: the API's own check of a virtual IP (the agent checks again before adding one)
parse = parse_vip
