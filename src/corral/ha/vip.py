"""Virtual IPs that move with an instance: add the address on the new host, announce it.

Peers cache the MAC address behind an IP; after a failover they would keep sending to the dead
host until their ARP entry expires (minutes). A gratuitous ARP (an unsolicited reply saying
"VIP is at my MAC") makes every peer on the segment update at once, which is how keepalived and
the peer-based HA of USERS.md §5 move an address. The ARP frame is built here (a raw AF_PACKET
socket, no extra package); the address itself is added with iproute2.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import time

from corral.errors import DriverError, InvalidRequest

ETH_P_ARP = 0x0806


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DriverError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}",
                          hint="virtual IPs need root and iproute2 on the host")


def parse(vip: str) -> ipaddress.IPv4Interface:
    """A virtual IP as given (``10.0.0.50/24``); refused when it cannot be one: loopback,
    link-local, multicast, unspecified or reserved addresses, and the network or broadcast
    address of its own prefix."""
    try:
        iface = ipaddress.IPv4Interface(vip if "/" in vip else f"{vip}/32")
    except ValueError as exc:
        raise InvalidRequest(
            f"bad virtual IP {vip!r}: {exc}",
            hint="give an IPv4 address with its prefix, e.g. 10.0.0.50/24",
        ) from exc
    ip, net = iface.ip, iface.network
    why = ("a loopback address" if ip.is_loopback else "a link-local address"
           if ip.is_link_local else "a multicast address" if ip.is_multicast
           else "the unspecified address" if ip.is_unspecified else "a reserved address"
           if ip.is_reserved else "its network's address" if net.prefixlen < 31
           and ip == net.network_address else "its network's broadcast address"
           if net.prefixlen < 31 and ip == net.broadcast_address else None)
    if why is not None:
        raise InvalidRequest(f"{vip} cannot be a virtual IP: it is {why}",
                             hint="give an unused unicast address of the hosts' segment")
    return iface


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
