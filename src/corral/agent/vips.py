"""Virtual IPs on this host: an instance's address is here exactly while it runs here.

The rule is one set computed from the instance records (the VIPs of alive instances), so every
path that changes what runs -- start, stop, kill, delete, an instance ending by itself, the
self-fence, an agent restart -- converges with one idempotent :meth:`Vips.sync` instead of each
remembering to undo its own address. Handlers still call :meth:`Vips.up` / :meth:`Vips.down` at
once, because a client should not wait for the next heartbeat to reach a new instance.

A VM's address is not on the host at all: it is the guest's own (so its TCP connections move
with the guest's memory in a live migration), and the host *routes* it, answering ARP for it on
the interface (a proxy entry) and forwarding to the VM's tap, where the qemu driver put a route.
During a live migration neither copy's host claims it while it is marked ``vip_away`` (the
destination until the switch-over, the source from the end of the stream), so exactly one host
answers for it at any time.

Adding announces the address with gratuitous ARPs (:mod:`corral.ha.vip`), so peers that cached
the dead host's MAC switch at once; ``sync`` announces only addresses it had to add, never one
already present, so a heartbeat does not spam the segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from corral.agent.store import InstanceRecord, write_atomic
from corral.errors import DriverError, InvalidRequest
from corral.ha import vip as viplib
from corral.lifecycle import ALIVE

log = logging.getLogger(__name__)

#: ``InstanceRecord.extra`` key: this copy must not hold its VIP (a live migration's other end)
AWAY = "vip_away"
#: seconds after the first gratuitous ARP (sent before ``up`` returns) to send it again, off
#: the caller's path: a peer that dropped one frame gets the next, and one whose entry was
#: updated less than its ``locktime`` (1 s) ago, or that heard a live migration's source a
#: last time, takes the later one
ANNOUNCE_AGAIN = (0.1, 0.5, 1.5)


def interface_of(address: str) -> str:
    """The interface that holds ``address`` in this network namespace (``ip -o -4 addr``)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                         timeout=10).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "inet" and parts[3].split("/")[0] == address:
            return parts[1].split("@")[0]
    raise DriverError(f"no interface holds host_address {address}, so virtual IPs have nowhere "
                      "to go", hint="set vip_interface (CORRAL_VIP_INTERFACE) on this agent")


def addresses_on(ifname: str) -> set[str]:
    """IPv4 addresses (without prefix) on ``ifname``."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", ifname],
                         capture_output=True, text=True, timeout=10).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "inet":
            found.add(parts[3].split("/")[0])
    return found


def check_spec_vip(vip: str | None, host_address: str = "") -> None:
    """Refuse at create what could only fail at start: a bad address, this host's own address,
    or no root to add it."""
    if vip is None:
        return
    ip = str(viplib.parse(vip).ip)
    if ip == host_address:
        raise InvalidRequest(f"{vip} is the address of this host itself, not a virtual IP",
                             hint="give an unused address of the segment")
    if os.geteuid() != 0:
        raise InvalidRequest(
            f"this agent cannot hold the virtual IP {vip}: adding addresses needs root",
            hint="run the agent as root (e.g. 'corral up --netns'), or create the instance "
                 "without --vip")


class Vips:
    """The agent's virtual IPs on one interface (resolved lazily: tests without VIPs never
    run ``ip``).

    Only addresses corral added are ever removed: each one added is written down in
    ``DATA/vips.json`` (so an agent restarted with -9 still knows), and removal, including
    ``sync``'s, touches nothing else. An address that was on the interface before corral came
    (the host's own, one an administrator configured) is refused as a VIP and never deleted."""

    def __init__(self, interface: str, host_address: str, state: Path | None = None,
                 routed: Callable[[str], bool] = lambda driver: False) -> None:
        """``routed(driver)``: whether that driver's instances hold their VIP themselves
        (``Capabilities.vip_in_guest``): the host routes such an address to them."""
        self._interface = interface
        self._routed = routed
        self.host_address = host_address
        #: one change at a time: a start's add racing a heartbeat's sync would add twice
        self._lock = asyncio.Lock()
        self._state = state
        self._announcing: set[asyncio.Task[None]] = set()
        self.added: set[str] = set()
        if state is not None:
            with contextlib.suppress(OSError, ValueError, TypeError):
                self.added = {str(v) for v in json.loads(state.read_text())}

    def _remember(self, ip: str, added: bool) -> None:
        before = set(self.added)
        (self.added.add if added else self.added.discard)(ip)
        if self._state is not None and self.added != before:
            write_atomic(self._state, json.dumps(sorted(self.added)).encode())

    def _add(self, vip: str, present: set[str] | None = None, routed: bool = False) -> None:
        """Add (and announce) ``vip``, refusing one already on the interface that corral
        did not put there: it belongs to someone else. ``routed``: the address is a VM's,
        answered for and forwarded, not added."""
        ip = str(viplib.parse(vip).ip)
        here = addresses_on(self.interface) if present is None else present
        if ip in here and ip not in self.added:
            raise DriverError(f"{ip} is already on {self.interface} and corral did not add it",
                              hint="it is the host's own or another's address: pick another "
                                   "virtual IP")
        self._remember(ip, True)  # before adding: a crash in between leaves it ours
        if routed:
            viplib.remove(self.interface, vip)  # held the other way before (a recreate)
            viplib.add_routed(self.interface, vip, announce=1)
        else:
            viplib.remove_routed(self.interface, vip)
            viplib.add(self.interface, vip, announce=1)

    def _announce_again(self, vip: str) -> None:
        task = asyncio.get_running_loop().create_task(self._repeat(str(viplib.parse(vip).ip)))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _repeat(self, ip: str) -> None:
        waited = 0.0
        for at in ANNOUNCE_AGAIN:
            await asyncio.sleep(at - waited)
            waited = at
            if ip not in self.added:  # let go meanwhile
                return
            try:
                await asyncio.to_thread(viplib.gratuitous_arp, self.interface, ip)
            except OSError as exc:
                log.warning("announcing virtual IP %s again failed: %s", ip, exc)
                return

    def _remove(self, vip: str) -> None:
        ip = str(viplib.parse(vip).ip)
        if ip not in self.added:
            log.warning("virtual IP %s is not one corral added here; left alone", vip)
            return
        viplib.remove(self.interface, vip)
        viplib.remove_routed(self.interface, vip)
        self._remember(ip, False)

    @property
    def interface(self) -> str:
        if not self._interface:
            self._interface = interface_of(self.host_address)
        return self._interface

    async def up(self, rec: InstanceRecord) -> None:
        """Add the instance's address and announce it (call after it started)."""
        if rec.spec.vip and not rec.extra.get(AWAY):
            async with self._lock:
                await asyncio.to_thread(self._add, rec.spec.vip, None, self._routed(rec.driver))
            self._announce_again(rec.spec.vip)
            log.info("virtual IP %s of %s is up on %s", rec.spec.vip, rec.name, self.interface)

    async def down(self, rec: InstanceRecord, records: dict[str, InstanceRecord]) -> None:
        """Remove the instance's address unless another alive instance here holds it too."""
        vip = rec.spec.vip
        if not vip or vip in wanted(records.values(), exclude=rec.name) or str(
                viplib.parse(vip).ip) not in self.added:  # let go already (a live migration)
            return
        try:
            async with self._lock:
                await asyncio.to_thread(self._remove, vip)
            log.info("virtual IP %s of %s removed from %s", vip, rec.name, self.interface)
        except Exception as exc:  # a failed removal must not fail the stop that asked for it
            log.error("could not remove virtual IP %s of %s: %s", vip, rec.name, exc)

    async def sync(self, records: dict[str, InstanceRecord]) -> None:
        """Make the interface hold exactly the VIPs of alive instances (among corral's own)."""
        if not any(r.spec.vip for r in records.values()):
            return
        async with self._lock:
            await self._sync(list(records.values()))

    async def _sync(self, recs: list[InstanceRecord]) -> None:
        want = wanted(recs)
        ours = {r.spec.vip for r in recs if r.spec.vip}
        routed = {r.spec.vip for r in recs if r.spec.vip and self._routed(r.driver)
                  and r.state in ALIVE and not r.extra.get(AWAY)}
        try:
            present = await asyncio.to_thread(addresses_on, self.interface)
            proxied = (await asyncio.to_thread(viplib.proxied, self.interface)
                       if any(self._routed(r.driver) for r in recs) else set())
        except Exception as exc:
            log.error("cannot list addresses on %s: %s", self._interface or "?", exc)
            return
        for vip in sorted(ours):
            ip = str(viplib.parse(vip).ip)
            held = proxied if vip in routed else present
            try:
                if vip in want and ip not in held:
                    await asyncio.to_thread(self._add, vip, present, vip in routed)
                    self._announce_again(vip)
                    log.warning("virtual IP %s was missing; added and announced", vip)
                elif vip not in want and ip in present | proxied and ip in self.added:
                    await asyncio.to_thread(self._remove, vip)
                    log.info("virtual IP %s removed: no instance here runs with it", vip)
            except Exception as exc:
                log.error("could not set virtual IP %s: %s", vip, exc)


def wanted(records: Iterable[InstanceRecord], exclude: str | None = None) -> set[str]:
    """VIPs that alive instances hold (but ``exclude``, and a live migration's other end)."""
    out: set[str] = set()
    for r in records:
        if r.spec.vip and r.state in ALIVE and r.name != exclude and not r.extra.get(AWAY):
            out.add(r.spec.vip)
    return out
