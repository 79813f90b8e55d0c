"""Live migration of a qemu VM: QEMU's own ``migrate``, carried by the agents' data channel.

**Memory and disk in one stream (block migration).** The destination QEMU is started with the
same machine, devices and disk path (``-incoming defer``, then ``migrate-incoming``); the source
runs ``migrate`` with the ``block`` capability, so QEMU copies the disk's blocks and the guest's
RAM through the same connection, tracks what the guest dirties in both, and switches over when
what is left fits ``downtime-limit``. Why not ``drive-mirror`` to an NBD export: in QEMU 7.2
neither ``drive-mirror`` nor ``blockdev-mirror`` takes a dirty bitmap, so a mirror with
``sync: full`` sends every allocated block again whatever corral's file pass already copied,
and it needs a second listener (the NBD server, with its own TLS) plus the ordering of the
mirror's completion against the memory switch-over (``pause-before-switchover``). Block
migration converges disk and memory in one dirty-tracking loop over one stream,
and its failure leaves nothing half-switched. The disk crosses once: corral's file pass puts the
rest of the disk directory (kernel, initrd, ``vm.json``) in the destination's slot and only the
*size* of ``disk.raw``, which the destination makes as a sparse file before QEMU opens it
(``rpc.SendArgs.shape_only``; a qcow2, whose empty file would not be one, and a btrfs pass,
which cannot leave a file out, still send it). Its drawback: QEMU 8.2 deprecated block migration
(9.1 removed it): on a newer QEMU this module is where the mirror goes.

**Carried by the agents' data channel.** Each QEMU talks to a unix socket in its own directory:
the destination's ``migrate-incoming`` listens on :data:`IN_SOCK`, the source's ``migrate``
connects to a listener its agent holds there, and the two agents carry the bytes over
their data channel (:mod:`corral.disks.tunnel`): mutual TLS with the hosts' enrolment
certificates (each end checks the other names the host the server said) and the server's
ticket for this instance from this source to this target. So no port opens for a migration,
no key is copied for QEMU to load, and one mechanism admits every host-to-host byte.

**Connections.** With user-mode networking the host end of a ``hostfwd`` connection is a socket
of the source QEMU process in the source host's network namespace; slirp migrates its own
tables but that socket cannot follow, so such connections break at switch-over (the forward
itself is listening again on the destination at once). Memory, CPU state, the guest's own
TCP stack and its uptime continue.
"""

from __future__ import annotations

from typing import Any

from corral.drivers.base import MigrationStats
from corral.errors import DriverError

__all__ = ["MigrationStats"]

#: the destination QEMU's incoming socket (a name in the VM's directory, QEMU's working
#: directory: a unix address holds only 108 bytes)
IN_SOCK = "migrate-in.sock"
#: QEMU's own default downtime limit
DEFAULT_DOWNTIME_MS = 300
#: bytes per second; QEMU 7.2's default (32 MiB/s) would make a 512 MiB guest take 16 s
MAX_BANDWIDTH = 1 << 30
#: how long QEMU may take to start listening
SETUP_TIMEOUT = 60.0
#: query-migrate statuses after which nothing more happens
ENDED = frozenset({"completed", "failed", "cancelled"})
#: how often the source is asked how far it got
POLL_EVERY = 0.1
#: how long a ``completed`` without its figures is asked again (see :func:`settled`)
SETTLE_TIMEOUT = 5.0


def settled(info: dict[str, Any], since: float, now: float) -> bool:
    """Whether a ``completed`` answer carries its figures. QEMU's migration thread sets the
    state to completed a moment before it computes ``total-time`` and ``downtime``; an answer
    in between reads 0 for both (a switch-over with no pause, which it was not). Asked again
    until they are there, for at most :data:`SETTLE_TIMEOUT` after the first such answer."""
    return bool(info.get("total-time")) or now - since > SETTLE_TIMEOUT


def parse_stats(info: dict[str, Any], completed: bool = False) -> MigrationStats:
    """``disk`` is the last block-migration figure seen while it ran (``query-migrate``
    leaves it out once the disk is done); a completed migration sent every block at least
    once, so its total is a floor."""
    ram = info.get("ram") or {}
    disk = info.get("disk") or {}
    down = info.get("downtime")
    setup = info.get("setup-time")
    return MigrationStats(
        status=str(info.get("status") or "none"),
        total_ms=float(info.get("total-time") or 0),
        downtime_ms=None if down is None else float(down),
        setup_ms=None if setup is None else float(setup),
        ram_bytes=int(ram.get("transferred") or 0),
        disk_bytes=max(int(disk.get("transferred") or 0),
                       int(disk.get("total") or 0) if completed else 0),
        dirty_syncs=int(ram.get("dirty-sync-count") or 0))


def uri(sock: str) -> str:
    """A socket name relative to QEMU's working directory (the VM's)."""
    if not sock or "/" in sock or "," in sock:
        raise DriverError(f"bad migration socket name {sock!r}", hint="this is an agent bug")
    return f"unix:{sock}"


def capabilities() -> dict[str, Any]:
    return {"capabilities": [{"capability": "block", "state": True},
                             {"capability": "events", "state": True}]}


def send_params(downtime_ms: int) -> dict[str, Any]:
    """The source's ``migrate-set-parameters``: every one set each time (a QEMU that migrated
    before keeps what the last migration set). ``downtime-limit`` is the pause the switch-over
    may take (setting ``live_migrate_downtime_ms``); a lower one makes a busy guest take more
    rounds, or never converge, a higher one ends sooner with a longer pause."""
    if not 1 <= int(downtime_ms) <= 60_000:
        raise DriverError(f"downtime limit {downtime_ms} ms is out of range",
                          hint="set live_migrate_downtime_ms between 1 and 60000")
    return {"downtime-limit": int(downtime_ms), "max-bandwidth": MAX_BANDWIDTH}


def set_send_params(execute: Any, downtime_ms: int) -> None:
    """Capabilities, then parameters, on the source's QMP (``execute(command, arguments)``)."""
    execute("migrate-set-capabilities", capabilities())
    execute("migrate-set-parameters", send_params(downtime_ms))


def failure(info: dict[str, Any]) -> str:
    return str(info.get("error-desc") or info.get("status") or "unknown")
