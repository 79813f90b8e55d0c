"""The parts of live migration that need no QEMU: how ``query-migrate`` is read, the private
TLS directory QEMU loads its credentials from, the downtime limit's way from the setting to
QMP, and the fake driver's model of a migration (what the agent's and server's unit tests run
against)."""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from corral.bus import rpc
from corral.config import Settings, load
from corral.control.operations.migrate import Migrate
from corral.drivers.base import LiveMigration, MigrationTls, Spec
from corral.drivers.fake import FakeDriver, FakeWorld
from corral.drivers.qemu_migrate import (
    CREDS_ID,
    TLS_DIR,
    parse_stats,
    remove_tls_dir,
    set_send_params,
    settled,
    uri,
    write_tls_dir,
)
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


def test_uri_brackets_ipv6() -> None:
    assert uri("10.0.0.2", 4444) == "tcp:10.0.0.2:4444"
    assert uri("fd00::2", 4444) == "tcp:[fd00::2]:4444"


def test_the_tls_directory_is_private_and_named_as_qemu_reads_it(tmp_path: Path) -> None:
    for name, text in (("ca.crt", "CA"), ("host.crt", "CERT"), ("host.key", "KEY")):
        (tmp_path / name).write_text(text)
    tls = MigrationTls(str(tmp_path / "ca.crt"), str(tmp_path / "host.crt"),
                       str(tmp_path / "host.key"))
    d = write_tls_dir(tmp_path, tls, "server")
    assert d == tmp_path / TLS_DIR and stat.S_IMODE(d.stat().st_mode) == 0o700
    assert sorted(p.name for p in d.iterdir()) == [
        "ca-cert.pem", "dh-params.pem", "server-cert.pem", "server-key.pem"]
    assert (d / "server-key.pem").read_text() == "KEY"
    assert stat.S_IMODE((d / "server-key.pem").stat().st_mode) == 0o600
    c = write_tls_dir(tmp_path, tls, "client")  # made again from scratch
    assert sorted(p.name for p in c.iterdir()) == ["ca-cert.pem", "client-cert.pem",
                                                    "client-key.pem"]
    remove_tls_dir(tmp_path)
    assert not c.exists()
    (tmp_path / "host.key").unlink()
    with pytest.raises(DriverError, match=r"host\.key"):
        write_tls_dir(tmp_path, tls, "client")


def test_the_fake_driver_hands_a_running_instance_over(tmp_path: Path) -> None:
    src = FakeDriver("a", FakeWorld(), can_live_migrate=True)
    dst = FakeDriver("b", FakeWorld(), can_live_migrate=True)
    assert isinstance(src, LiveMigration) and src.capabilities.can_live_migrate
    spec = Spec("vm", ["run"], str(tmp_path))
    hs = src.start(src.create(spec))
    src.set_cpu(hs.name, 5_000)
    hd, port = dst.incoming(dst.create(spec), "127.0.0.1", None, "a")
    assert dst.status(hd).state == "frozen"
    assert dst.incoming(hd, "127.0.0.1", None, "a") == (hd, port)  # idempotent
    stats = src.migrate_out(hs, "127.0.0.1", port, None, "b", 300, 10)
    assert stats.status == "completed"
    assert (src.status(hs).state, dst.status(hd).state) == ("frozen", "running")
    assert dst.stats([hd])["vm"].cpu_ns == 5_000  # the counters went with it
    with pytest.raises(DriverError):  # nothing waits on that port any more
        src.migrate_out(hs, "127.0.0.1", port, None, "b", 300, 10)
    src.migration_abort(hs)
    assert src.status(hs).state == "running"
    with pytest.raises(NotSupported):
        FakeDriver().incoming(hd, "127.0.0.1", None, "a")


def test_the_downtime_limit_reaches_qmp_before_the_stream_starts() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    set_send_params(lambda cmd, args: sent.append((cmd, args)), 1234, "h2")
    assert [c for c, _ in sent] == ["migrate-set-capabilities", "migrate-set-parameters"]
    params = sent[1][1]
    assert params["downtime-limit"] == 1234
    assert (params["tls-creds"], params["tls-hostname"]) == (CREDS_ID, "h2")
    sent.clear()
    set_send_params(lambda cmd, args: sent.append((cmd, args)), 300, None)
    assert sent[1][1]["downtime-limit"] == 300
    assert sent[1][1]["tls-creds"] == "" and "tls-hostname" not in sent[1][1]  # plain TCP
    with pytest.raises(DriverError, match="live_migrate_downtime_ms"):
        set_send_params(lambda cmd, args: None, 0, None)


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

    op = Migrate(None, Agents(), Settings(data_dir=tmp_path,  # type: ignore[arg-type]
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
    assert ctx.data["downtime_ms"] == 40.0
