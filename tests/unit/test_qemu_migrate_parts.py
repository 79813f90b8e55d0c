"""The parts of live migration that need no QEMU: how ``query-migrate`` is read, the stream's
socket name, the downtime limit's way from the setting to QMP, the stream's ticket, and the
fake driver's model of a migration (what the agent's and server's unit tests run
against)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from corral.bus import rpc
from corral.config import Settings, load
from corral.control.operations.migrate import Migrate
from corral.disks import tickets, tunnel
from corral.drivers.base import LiveMigration, Spec
from corral.drivers.fake import FakeDriver, FakeWorld
from corral.drivers.qemu_migrate import parse_stats, set_send_params, settled, uri
from corral.errors import ConfigError, DriverError, NotSupported


def test_stats_keep_the_disk_figure_query_migrate_drops_once_done() -> None:
    running = {"status": "active", "total-time": 900, "ram": {"transferred": 10},
               "disk": {"transferred": 5, "total": 64}}
    assert parse_stats(running).disk_bytes == 5
    done = {"status": "completed", "total-time": 1200, "downtime": 87, "setup-time": 20,
            "ram": {"transferred": 67_000_000, "dirty-sync-count": 3},
            "disk": {"transferred": 40, "total": 64}}
    st = parse_stats(done, completed=True)
    assert (st.status, st.downtime_ms, st.ram_bytes, st.disk_bytes, st.dirty_syncs) == \
        ("completed", 87.0, 67_000_000, 64, 3)
    assert parse_stats({"status": "failed"}).downtime_ms is None


def test_a_completed_answer_without_its_figures_is_asked_again() -> None:
    """QEMU says completed a moment before it fills in total-time and downtime (0 until then):
    such an answer is read again, a bounded while."""
    early = {"status": "completed", "total-time": 0, "downtime": 0}
    assert not settled(early, since=10.0, now=10.1)
    assert settled({**early, "total-time": 1500, "downtime": 40}, since=10.0, now=10.1)
    assert settled(early, since=10.0, now=16.0)  # never filled in: taken as it is


def test_the_stream_socket_is_a_plain_name_in_qemus_directory() -> None:
    assert uri("migrate-in.sock") == "unix:migrate-in.sock"
    for bad in ("", "../x.sock", "/tmp/x.sock", "a,server=on"):
        with pytest.raises(DriverError, match="bad migration socket name"):
            uri(bad)


def test_the_fake_driver_hands_a_running_instance_over(tmp_path: Path) -> None:
    src = FakeDriver("a", FakeWorld(), can_live_migrate=True)
    dst = FakeDriver("b", FakeWorld(), can_live_migrate=True)
    assert isinstance(src, LiveMigration) and src.capabilities.can_live_migrate
    spec = Spec("vm", ["run"], str(tmp_path))
    hs = src.start(src.create(spec))
    src.set_cpu(hs.name, 5_000)
    hd, sock = dst.incoming(dst.create(spec), "a")
    assert dst.status(hd).state == "frozen"
    assert dst.incoming(hd, "a") == (hd, sock)  # idempotent
    assert dst.stream_dir(hd) == tmp_path
    stats = src.migrate_out(hs, sock, "b", 300, 10)
    assert stats.status == "completed"
    assert (src.status(hs).state, dst.status(hd).state) == ("frozen", "running")
    assert dst.stats([hd])["vm"].cpu_ns == 5_000  # the counters went with it
    with pytest.raises(DriverError):  # nothing waits on that socket any more
        src.migrate_out(hs, sock, "b", 300, 10)
    src.migration_abort(hs)
    assert src.status(hs).state == "running"
    with pytest.raises(NotSupported):
        FakeDriver().incoming(hd, "a")


def test_the_downtime_limit_reaches_qmp_before_the_stream_starts() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    set_send_params(lambda cmd, args: sent.append((cmd, args)), 1234)
    assert [c for c, _ in sent] == ["migrate-set-capabilities", "migrate-set-parameters"]
    assert sent[1][1]["downtime-limit"] == 1234
    sent.clear()
    set_send_params(lambda cmd, args: sent.append((cmd, args)), 300)
    assert sent[1][1]["downtime-limit"] == 300
    with pytest.raises(DriverError, match="live_migrate_downtime_ms"):
        set_send_params(lambda cmd, args: None, 0)


def test_the_downtime_setting_is_bounded_and_defaults_to_qemus() -> None:
    assert Settings().live_migrate_downtime_ms == 300
    assert load(env={"CORRAL_LIVE_MIGRATE_DOWNTIME_MS": "50"}).live_migrate_downtime_ms == 50
    for bad in ("0", "60001", "fast"):
        with pytest.raises(ConfigError, match="live_migrate_downtime_ms"):
            load(env={"CORRAL_LIVE_MIGRATE_DOWNTIME_MS": bad})


async def test_the_server_sends_the_setting_to_the_source_agent(tmp_path: Path) -> None:
    calls: list[tuple[str, str, Any]] = []

    class Agents:
        async def call(self, host: str, call: rpc.Call[Any, Any], args: Any) -> Any:
            calls.append((host, call.verb, args))
            return rpc.LiveStats(status="completed", total_ms=900.0, downtime_ms=40.0,
                                 ram_bytes=10, disk_bytes=5, dirty_syncs=2)

    key = Ed25519PrivateKey.generate()
    fleet = SimpleNamespace(ticket_key=key)
    op = Migrate(fleet, Agents(), Settings(data_dir=tmp_path,  # type: ignore[arg-type]
                                           live_migrate_downtime_ms=75))
    ctx = SimpleNamespace(
        data={"source": "h1", "target": "h2", "incoming": {"address": "10.0.0.2", "port": 4444}},
        record=SimpleNamespace(target="vm"), save=lambda: None)
    switched: list[str] = []

    async def switchover(c: Any) -> None:  # the claim and the record (test_op_faults' model)
        switched.append(c.data["target"])

    op._switchover = switchover  # type: ignore[method-assign,assignment]
    await op._live_send(ctx)  # type: ignore[arg-type]
    assert switched == ["h2"]  # in the same step, after the stream
    [(host, verb, args)] = calls
    assert (host, verb) == ("h1", "live_send") and isinstance(args, rpc.LiveSendArgs)
    assert (args.downtime_ms, args.address, args.port, args.target) == (75, "10.0.0.2", 4444, "h2")
    # the stream's ticket: this instance, from the source to the target, for a stream only
    got = tickets.verify(args.ticket, key.public_key())
    assert (got.instance, got.slot, got.source, got.target) == ("vm", tunnel.LIVE, "h1", "h2")
    assert ctx.data["downtime_ms"] == 40.0
