"""The ``--netns`` network on its own: bridge, namespaces, addresses, routes, and cleanup."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys

import pytest

from corral.errors import CorralError
from corral.rig import netns

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]


def _connect_from(ns: str, address: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({address!r}, {port}), timeout=3)"
    proc = subprocess.run([*netns.enter_argv(ns), sys.executable, "-c", code],
                          capture_output=True, timeout=15)
    return proc.returncode == 0


def _reaches_root(ns: str, address: str) -> bool:
    """A TCP connection from inside ``ns`` to a listener on ``address`` in the root namespace."""
    with socket.socket() as srv:
        srv.bind((address, 0))
        srv.listen(1)
        return _connect_from(ns, address, srv.getsockname()[1])


def _reaches_ns(src: str, dst: str, address: str) -> bool:
    """The same between two host namespaces (the listener runs inside ``dst``)."""
    code = (f"import socket; s = socket.socket(); s.bind(({address!r}, 45678)); s.listen(1); "
            "print('ready', flush=True); s.accept()")
    listener = subprocess.Popen([*netns.enter_argv(dst), sys.executable, "-c", code],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "ready"
        return _connect_from(src, address, 45678)
    finally:
        listener.kill()
        listener.wait(timeout=10)


def test_build_reach_and_clean_up() -> None:
    net = netns.create(2)
    try:
        assert netns.link_exists(net.bridge)
        assert netns.namespaces_of(net.tag) == net.namespaces
        assert _reaches_root(net.namespace(1), net.gateway)
        assert _reaches_ns(net.namespace(1), net.namespace(2), net.address(2))
        routes = netns.ip("-n", net.namespace(2), "route").stdout
        assert f"default via {net.gateway}" in routes
        other = netns.pick_subnet()
        assert other != net.subnet
    finally:
        assert netns.cleanup(net) == []
    assert netns.namespaces_of(net.tag) == []
    assert not netns.link_exists(net.bridge)
    assert not netns.link_exists(net.veth(1))


def test_a_failed_build_leaves_nothing() -> None:
    tag = secrets.token_hex(3)
    netns.ip("netns", "add", f"crl-{tag}-h2")  # host 2's namespace is taken: the build fails
    try:
        with pytest.raises(CorralError, match="failed"):
            netns.create(2, tag=tag)
        assert netns.namespaces_of(tag) == []
        assert not netns.link_exists(f"crl{tag}")
    finally:
        netns.cleanup(tag)
