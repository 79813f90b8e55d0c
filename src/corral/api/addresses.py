"""Addresses as the API takes them: what a virtual IP may be (checked by the server before it
records one, and by the agent again before it adds one)."""

from __future__ import annotations

import ipaddress

from corral.errors import InvalidRequest


def parse_vip(vip: str) -> ipaddress.IPv4Interface:
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
