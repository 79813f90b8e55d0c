"""A VM with a virtual IP: the address is the guest's own, on a tap its host routes to.

Why not the user-mode network (slirp) the driver uses otherwise: a connection to a ``hostfwd``
port ends at a socket of the *source* QEMU, in the source host's kernel; a live migration moves
the guest's memory, so the guest's half of the connection arrives on the new host while the
client's half still talks to the old host's socket, and it breaks. With the address in the
guest, the whole TCP state is guest memory and moves with it; the network only has to deliver
the packets to the new host, which is one gratuitous ARP (the agent's :mod:`corral.agent.vips`
sends it when the destination takes the address over, after the source let it go).

The layout on a host, per VM (made by QEMU and this module; all of it goes away with QEMU,
since the tap is QEMU's and not persistent):

- a tap ``crv<hash of the name>``, opened by QEMU (``-netdev tap,ifname=...``), with the same
  MAC and the link-local address :data:`GATEWAY` on every host and for every VM: the guest's
  gateway, whose ARP entry the guest keeps across a migration, so it finds the new host's tap
  without asking again;
- a host route ``VIP/32 dev TAP``, and forwarding enabled on the tap;
- in the guest (its init reads ``opt/corral/net`` from fw_cfg): ``VIP/32`` on ``eth0``, a route
  to :data:`GATEWAY` on the link, and the default route through it.

Answering ARP for the VIP on the host's interface is the agent's part (``ip neigh add proxy``),
since which host answers is decided by who owns the instance, not by which QEMU runs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import subprocess

from corral.errors import DriverError, InvalidRequest

#: the host's end of every VM's tap: the guest's gateway
GATEWAY = "169.254.0.1"
#: the MAC of that end, the same everywhere (locally administered)
GATEWAY_MAC = "02:63:72:6c:00:01"
#: where the guest reads its address (fw_cfg), next to ``opt/corral/run``
FW_CFG_NET = "opt/corral/net"


def tap_name(instance: str) -> str:
    """At most 15 bytes (IFNAMSIZ), the same for the instance on every host."""
    return "crv" + hashlib.sha256(instance.encode()).hexdigest()[:11]


def guest_mac(instance: str) -> str:
    """QEMU's own prefix and three bytes of the name: stable across restarts and moves."""
    h = hashlib.sha256(b"mac:" + instance.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def address_of(vip: str) -> str:
    """The bare address of ``ADDR[/PREFIX]``, checked (it goes into QEMU's options)."""
    try:
        return str(ipaddress.IPv4Interface(vip).ip)
    except ValueError as e:
        raise InvalidRequest(f"virtual IP {vip!r} is no IPv4 address",
                             hint="give it as ADDR/PREFIX, e.g. 10.0.0.50/24") from e


def qemu_args(instance: str, vip: str) -> tuple[str, str, list[str]]:
    """(the ``-netdev`` value, the ``-device`` value, more options) of a routed VM."""
    netdev = f"tap,id=net0,ifname={tap_name(instance)},script=no,downscript=no"
    device = f"virtio-net-pci,netdev=net0,mac={guest_mac(instance)},romfile="
    return netdev, device, ["-fw_cfg", f"name={FW_CFG_NET},string={address_of(vip)}"]


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise DriverError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}",
                          hint="a VM with a virtual IP needs root and iproute2 on its host")


def plumb(instance: str, vip: str) -> None:
    """The host's end of the VM's tap (QEMU made it): up, the gateway's MAC and address, the
    route to the VIP, forwarding from the tap. Idempotent."""
    tap = tap_name(instance)
    _ip("link", "set", tap, "address", GATEWAY_MAC)
    _ip("link", "set", tap, "up")
    _ip("addr", "replace", f"{GATEWAY}/32", "dev", tap)
    _ip("route", "replace", f"{address_of(vip)}/32", "dev", tap)
    try:
        with open(f"/proc/sys/net/ipv4/conf/{tap}/forwarding", "w") as fh:
            fh.write("1")
    except OSError as e:
        raise DriverError(f"cannot enable forwarding on {tap}: {e}",
                          hint="a VM with a virtual IP needs root") from e
