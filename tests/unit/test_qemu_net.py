"""The names and options of a VM with a virtual IP (drivers/qemu_net.py): what must hold on
every host for a guest to find its gateway after a live migration."""

from __future__ import annotations

import re

import pytest

from corral.drivers import qemu_net
from corral.errors import InvalidRequest


def test_the_tap_name_fits_ifnamsiz_and_is_the_same_on_every_host() -> None:
    names = {qemu_net.tap_name(f"vm{i}") for i in range(500)}
    assert len(names) == 500
    assert all(len(n) <= 15 and re.fullmatch(r"crv[0-9a-f]+", n) for n in names)
    assert qemu_net.tap_name("web") == qemu_net.tap_name("web")
    assert qemu_net.tap_name("a" * 63) != qemu_net.tap_name("a" * 62)


def test_the_guest_mac_is_stable_unicast_and_qemus() -> None:
    mac = qemu_net.guest_mac("web")
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)
    assert mac == qemu_net.guest_mac("web") != qemu_net.guest_mac("db")
    first = int(qemu_net.GATEWAY_MAC.split(":")[0], 16)
    assert first & 0b10 and not first & 0b1  # locally administered, unicast


def test_qemu_options_carry_the_bare_address_and_nothing_else() -> None:
    netdev, device, more = qemu_net.qemu_args("web", "10.1.2.3/24")
    assert netdev.startswith("tap,id=net0,ifname=crv") and "script=no" in netdev
    assert f"mac={qemu_net.guest_mac('web')}" in device
    assert more == ["-fw_cfg", "name=opt/corral/net,string=10.1.2.3"]
    for bad in ("10.1.2.3/24,script=/tmp/x", "fe80::1/64", "10.1.2/24", ""):
        with pytest.raises(InvalidRequest, match="no IPv4 address"):
            qemu_net.qemu_args("web", bad)
