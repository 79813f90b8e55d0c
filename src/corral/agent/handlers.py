"""One thin handler per server -> agent call of :data:`corral.bus.rpc.CALLS`.

Each handler checks its arguments, takes the instance's lock, calls the driver in a worker thread
and returns a JSON-able result. Policy (placement, the lifecycle table) is the server's; the agent
only adds what only it can know: the epoch fence and whether an end was asked for.
"""

from __future__ import annotations

import asyncio
import logging
import signal as signals
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.agent import capture, imagecache, restart, rootfs
from corral.agent.busybox import copy_template
from corral.agent.disk_handlers import HANDLERS as DISK_HANDLERS
from corral.agent.disks import make_shapes
from corral.agent.live_handlers import HANDLERS as LIVE_HANDLERS
from corral.agent.report import apply_status, is_alive, to_report
from corral.agent.shelf import HANDLERS as SHELF_HANDLERS
from corral.agent.state import AgentState, Handler
from corral.agent.store import InstanceRecord, check_name
from corral.agent.vips import check_spec_vip
from corral.bus import rpc
from corral.bus.messages import InstanceReport, WireSpec
from corral.drivers.base import Spec
from corral.drivers.runs import KILL_WAIT
from corral.errors import Conflict, DriverError, InvalidRequest
from corral.lifecycle import ENDED, State

log = logging.getLogger(__name__)


#: signals that end a workload on purpose: what follows reads as "stopped", not "failed".
_ENDING_SIGNALS = frozenset({signals.SIGTERM, signals.SIGKILL, signals.SIGINT, signals.SIGQUIT})


def _name(args: rpc.NameArgs) -> str:
    return check_name(args.name)


def _check_epoch(st: AgentState, name: str, epoch: Any) -> int | None:
    """Refuse an epoch older than the newest one seen (a stale server or a fenced owner)."""
    if epoch is None:
        return None
    if not isinstance(epoch, int):
        raise InvalidRequest(f"epoch must be an integer, got {epoch!r}")
    newest = st.epochs.get(name, 0)
    if epoch < newest:
        raise Conflict(
            f"stale epoch {epoch} for instance '{name}': this host has seen epoch {newest}",
            hint="a newer owner took this instance over; refresh state and retry",
            details={"epoch": epoch, "newest": newest},
        )
    st.epochs[name] = epoch
    return epoch


def _check_if_epoch(rec: InstanceRecord, args: rpc.KillArgs | rpc.DeleteArgs) -> None:
    """``if_epoch``: act only on the copy the caller saw. Reconciling kills and deletes a stale
    copy by the epoch it reported; if this host has since moved on to another epoch (the
    instance came back here), the call is about a copy that no longer exists."""
    want = args.if_epoch
    if want is not None and rec.epoch != want:
        raise Conflict(f"instance '{rec.name}' here is at epoch {rec.epoch}, not {want}; "
                       "left alone", hint="the caller's view is stale; look again",
                       details={"epoch": rec.epoch, "if_epoch": want})


async def create(st: AgentState, args: rpc.CreateArgs) -> InstanceReport:
    spec = args.spec
    name = check_name(spec.name)
    drv = st.driver(spec.driver)
    check_spec_vip(spec.vip, st.vips.host_address if st.vips is not None else "")
    async with st.lock(name):
        existing = st.records.get(name)
        if existing is not None:
            if existing.spec.model_copy(update={"epoch": 0}) != spec.model_copy(
                update={"epoch": 0}
            ):
                raise Conflict(f"instance '{name}' already exists here with another spec",
                               hint="delete it first or pick another name")
            _check_epoch(st, name, spec.epoch)
            return to_report(existing)
        _check_epoch(st, name, spec.epoch)
        workdir = st.store.dir_for(name)
        workdir.mkdir(parents=True, exist_ok=True)
        extra: dict[str, Any] = {}
        made_disk = False
        try:
            root = spec.rootfs
            if spec.image is not None and spec.rootfs is not None:
                raise InvalidRequest("a spec gives either an image or a rootfs, not both")
            if root is None and st.disks is not None:
                made_disk = not st.disks.exists(name)
                root = str(await _disk_root(st, spec, drv.capabilities.needs_rootfs, workdir,
                                            extra, fresh=args.fresh))
                extra["disk"] = root
                if args.shapes and not made_disk:  # a live migration's adopted disk
                    await st.call(make_shapes, Path(root), dict(args.shapes))
                # a plain process runs *in* its disk; its tail paths stay host paths
                extra["cwd_disk"] = not drv.capabilities.needs_rootfs and spec.image is None
            elif spec.image is not None:
                root, extra["image"] = await _image_root(st, spec, workdir)
            elif root is None and drv.capabilities.needs_rootfs:
                root = str(await st.call(rootfs.instance_rootfs, st.data_dir, workdir))
            dspec = Spec(name=name, command=list(spec.command), workdir=str(workdir),
                         rootfs=root, env=dict(spec.env), cpus=spec.cpus,
                         memory_bytes=spec.memory_bytes, uid=spec.uid, gid=spec.gid,
                         additional_gids=tuple(spec.additional_gids), cwd=spec.cwd,
                         stop_signal=spec.stop_signal, vip=spec.vip)
            handle = await st.call(drv.create, dspec)
        except BaseException:
            await st.call(st.store.remove, name)  # no record was written: leave nothing behind
            if made_disk and st.disks is not None:
                await st.call(st.disks.delete, name)
            raise
        rec = InstanceRecord(spec=spec, handle=handle, epoch=spec.epoch, state="created",
                             extra=extra)
        if extra.get("disk") and not made_disk:  # a disk that came from another host
            await st.call(capture.skip_copied_lines, rec, workdir)  # before capture sees it
        st.save(rec)
        st.records[name] = rec
        return to_report(rec)


async def _disk_root(st: AgentState, spec: WireSpec, needs_rootfs: bool, workdir: Path,
                     extra: dict[str, Any], fresh: bool = False) -> Path:
    """The instance's own disk: the one already here (adopted from a migration, a standby or
    a shelf), else a new one filled elsewhere and renamed into place, so a disk at its final
    path is always complete."""
    disks = st.disks
    assert disks is not None
    if disks.exists(spec.name):
        if not fresh:
            return disks.path(spec.name)
        # a new instance never inherits a disk: set an earlier one's aside, never delete it
        kept = await st.call(disks.set_aside, spec.name)
        log.warning("a disk named %s was already here (an instance removed while this host "
                    "was away?); kept it as %s", spec.name, kept)
    fill = await st.call(disks.new_dir, spec.name)
    if spec.image is not None:
        if st.images is None:
            raise InvalidRequest("this agent has no image cache", hint="this is an agent bug")
        extra["image"] = await asyncio.to_thread(
            st.images.materialize, spec.image, fill, workdir / imagecache.CHUNKS_FILE, True)
    elif needs_rootfs:
        template = await st.call(rootfs.template, st.data_dir)
        await st.call(copy_template, template, fill)
    return await st.call(disks.publish, spec.name, fill)


async def _image_root(st: AgentState, spec: WireSpec, workdir: Path) -> tuple[str, Any]:
    """Materialise ``spec.image`` at ``<workdir>/rootfs`` from this host's chunk cache."""
    if spec.rootfs is not None:
        raise InvalidRequest("a spec gives either an image or a rootfs, not both")
    if st.images is None:
        raise InvalidRequest("this agent has no image cache", hint="this is an agent bug")
    image = spec.image or ""
    dest = workdir / "rootfs"
    info = await asyncio.to_thread(st.images.materialize, image, dest,
                                   workdir / imagecache.CHUNKS_FILE)
    return str(dest), info


async def start(st: AgentState, args: rpc.StartArgs) -> InstanceReport:
    name = _name(args)
    async with st.lock(name):
        rec = st.record(name)
        epoch = _check_epoch(st, name, args.epoch)
        drv = st.driver(rec.driver)
        if epoch is not None:
            rec.epoch = epoch
        rec.stop_requested = False
        rec.extra.pop("fenced_at", None)
        restart.reset(rec)  # an operator's start: the policy's attempts start over
        rec.handle = await st.call(drv.start, rec.handle)
        st.save(rec)
        report = await st.refresh(rec)
        if rec.spec.vip and st.vips is not None and is_alive(rec):
            await _vip_up(st, rec)
        return report


async def restart_ended(st: AgentState, rec: InstanceRecord,
                        made: Callable[[InstanceRecord], None]) -> bool:
    """The agent's own start of an instance that ended and that its restart policy covers
    (agent/restart.py): only if it is still that record, still ended and not stopped on
    purpose meanwhile. ``made`` counts the attempt; False when nothing was done."""
    name = rec.name
    async with st.lock(name):
        if (st.records.get(name) is not rec or rec.stop_requested or rec.state not in ENDED
                or "restart_due" not in rec.extra):
            return False
        made(rec)
        st.save(rec)
        log.info("restarting %s under its policy (restart %d)", name,
                 restart.restarts(rec))
        rec.handle = await st.call(st.driver(rec.driver).start, rec.handle)
        rec.state = State.RUNNING.value  # started: an end seen next is a new end
        st.save(rec)
        await st.refresh(rec)
        if rec.spec.vip and st.vips is not None and is_alive(rec):
            await _vip_up(st, rec)
        st.changed.set()
        return True


async def _vip_up(st: AgentState, rec: InstanceRecord) -> None:
    """Add the started instance's VIP; if that fails, the start fails: an instance that runs
    where its clients cannot reach it is worse than one that says why it did not start."""
    assert st.vips is not None
    try:
        await st.vips.up(rec)
    except Exception as exc:
        rec.stop_requested = True
        st.save(rec)
        await st.call(st.driver(rec.driver).kill, rec.handle, int(signals.SIGKILL))
        for _ in range(40):  # bounded: the VIP rule follows the state, so wait for the end
            if not is_alive(rec):
                break
            await asyncio.sleep(0.05)
            await st.refresh(rec)
        await st.vips.down(rec, st.records)
        raise DriverError(f"instance '{rec.name}' started but its virtual IP {rec.spec.vip} "
                          f"could not be added, so it was stopped again: {exc}",
                          hint="check vip_interface on this agent and that the address is "
                               "free on the segment") from exc


async def stop(st: AgentState, args: rpc.StopArgs) -> InstanceReport:
    name = _name(args)
    timeout = st.stop_timeout if args.timeout is None else args.timeout
    async with st.lock(name):
        rec = st.record(name)
        rec.stop_requested = True
        st.save(rec)
        status = await st.call(st.driver(rec.driver).stop, rec.handle, timeout)
        apply_status(rec, status)
        st.save(rec)
        if st.vips is not None and not is_alive(rec):
            await st.vips.down(rec, st.records)
        return to_report(rec)


async def kill(st: AgentState, args: rpc.KillArgs) -> InstanceReport:
    name = _name(args)
    sig = args.signal
    async with st.lock(name):
        rec = st.record(name)
        _check_if_epoch(rec, args)
        if sig in _ENDING_SIGNALS:
            rec.stop_requested = True
            st.save(rec)
        drv = st.driver(rec.driver)
        await st.call(drv.kill, rec.handle, sig)
        report = await st.refresh(rec)
        # A deadly signal takes a moment to land, and the instance has ended only when every
        # process of it is reaped; wait (bounded) so the reply says how it ended. A SIGKILL
        # gets as long as a stop does: the caller may be about to start a copy elsewhere.
        wait = KILL_WAIT if sig == signals.SIGKILL else 2.0 if sig in _ENDING_SIGNALS else 0.0
        deadline = asyncio.get_running_loop().time() + wait
        while report.state in ("running", "frozen") and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            report = await st.refresh(rec)
        if st.vips is not None and not is_alive(rec):
            await st.vips.down(rec, st.records)
        return report


async def _driver_verb(st: AgentState, args: rpc.NameArgs, verb: str) -> InstanceReport:
    """A verb that is one driver call on the instance, answered with what it looks like after."""
    name = _name(args)
    async with st.lock(name):
        rec = st.record(name)
        await st.call(getattr(st.driver(rec.driver), verb), rec.handle)
        return await st.refresh(rec)


async def freeze(st: AgentState, args: rpc.NameArgs) -> InstanceReport:
    return await _driver_verb(st, args, "freeze")


async def thaw(st: AgentState, args: rpc.NameArgs) -> InstanceReport:
    return await _driver_verb(st, args, "thaw")


async def delete(st: AgentState, args: rpc.DeleteArgs) -> None:
    """Remove the instance; its disk too unless ``keep_disk`` (a shelf or a standby keeps it);
    ``set_aside`` keeps the disk out of the way (``.orphaned``) instead of deleting it: a stale
    copy removed after a failover may hold writes made after the standby's last sync."""
    name = _name(args)
    keep_disk = args.keep_disk
    async with st.lock(name):
        rec = st.records.get(name)
        if rec is None:
            # a guarded delete was about a copy that is gone; a disk here now is someone else's
            if not keep_disk and st.disks is not None and args.if_epoch is None:
                await st.call(st.disks.delete, name)
            return None  # already gone: delete is idempotent
        _check_if_epoch(rec, args)
        report = await st.refresh(rec)
        if report.state in ("running", "frozen"):
            raise Conflict(f"instance '{name}' is {report.state}; stop it before deleting",
                           hint=f"corral stop {name}")
        if st.vips is not None:
            await st.vips.down(rec, st.records)
        for hook in st.before_delete:
            await hook(name)
        await st.call(st.driver(rec.driver).delete, rec.handle)
        await st.call(st.store.remove, name)
        del st.records[name]
        if "disk" in rec.extra and st.disks is not None and not keep_disk:
            if args.set_aside and st.disks.exists(name):
                kept = await st.call(st.disks.set_aside, name)
                log.warning("the disk of %s (removed as a stale copy) is kept as %s", name, kept)
            else:
                await st.call(st.disks.delete, name)
        if rec.spec.image is not None and st.images is not None:
            await st.images.released(rec.spec.image)
        return None


async def status(st: AgentState, args: rpc.NameArgs) -> InstanceReport:
    name = _name(args)
    async with st.lock(name):
        return await st.refresh(st.record(name))


async def list_(st: AgentState, args: rpc.NoArgs) -> list[InstanceReport]:
    out = []
    for name in list(st.records):
        async with st.lock(name):
            rec = st.records.get(name)
            if rec is not None:
                out.append(await st.refresh(rec))
    return out


HANDLERS: dict[str, Handler] = {
    "create": create,
    "start": start,
    "stop": stop,
    "kill": kill,
    "freeze": freeze,
    "thaw": thaw,
    "delete": delete,
    "status": status,
    "list": list_,
    **DISK_HANDLERS,
    **SHELF_HANDLERS,
    **LIVE_HANDLERS,
}
