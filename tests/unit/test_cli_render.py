"""The one error formatter and the table/JSON renderers."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from corral.api.models import HostView, InstanceView, Resources, Usage
from corral.cli import render
from corral.cli.main import run_cli
from corral.cli.top import SortKey, host_summary, sort_instances
from corral.errors import InvalidTransition, NoCapacity, Unauthorized


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, color_system=None), buf


def test_error_format_is_pinned() -> None:
    console, buf = _console()
    code = render.report_error(
        InvalidTransition("cannot thaw instance 'a': it is running",
                          hint="from running you can: stop, kill, restart, freeze"),
        console,
    )
    assert code == InvalidTransition.exit_code == 5
    assert buf.getvalue() == (
        "error: cannot thaw instance 'a': it is running\n"
        "hint: from running you can: stop, kill, restart, freeze\n"
    )


def test_error_without_hint_and_with_shortfall() -> None:
    console, buf = _console()
    exc = NoCapacity("no host can take 8 cpus", details={
        "shortfall": {"host1": {"cpus": 6.0}, "host2": "needs 1G more memory"}})
    assert render.report_error(exc, console) == 6
    lines = buf.getvalue().splitlines()
    assert lines[0] == "error: no host can take 8 cpus"
    assert "  host1: cpus 6.0" in lines
    assert "  host2: needs 1G more memory" in lines
    console, buf = _console()
    assert render.report_error(Unauthorized("bad token"), console) == 3
    assert buf.getvalue() == "error: bad token\n"


def test_cli_reports_missing_fleet_on_stderr(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: object, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    monkeypatch.setenv("CORRAL_CONTEXT", f"{tmp_path}/none.json")
    monkeypatch.delenv("CORRAL_URL", raising=False)
    assert run_cli(["ls"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: no corral fleet found")
    assert "hint: run 'corral up'" in captured.err


def test_cli_bad_memory_exit_code(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CORRAL_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("CORRAL_TOKEN", "t")
    assert run_cli(["run", "x", "--memory", "12Q", "--", "sleep", "1"]) == 2
    assert "error: bad memory size '12Q'" in capsys.readouterr().err
    assert run_cli(["run", "Bad_Name", "--", "sleep", "1"]) == 2
    assert "name" in capsys.readouterr().err


def test_usage_error_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["top", "--sort", "colour"]) == 2
    assert "colour" in capsys.readouterr().err


def test_formatting() -> None:
    assert render.fmt_bytes(None) == "-"
    assert render.fmt_bytes(512) == "512B"
    assert render.fmt_bytes(64 * 1024**2) == "64.0M"
    assert render.fmt_pct(None) == "-"
    assert render.fmt_pct(49.96) == "50.0"


def _inst(name: str, cpu: float | None, mem: int | None) -> InstanceView:
    return InstanceView(name=name, host="host1", driver="process", command=["x"], cpus=0.1,
                        memory_bytes=1, desired_state="running", state="running",
                        created_at=0, updated_at=0,
                        usage=Usage(cpu_core_pct=cpu, cpu_host_pct=None if cpu is None
                                    else cpu / 2, memory_bytes=mem))


def test_top_sorting_and_summary() -> None:
    items = [_inst("b", 5.0, 10), _inst("a", None, None), _inst("c", 99.0, 5)]
    assert [i["name"] for i in sort_instances(items, SortKey.cpu)] == ["c", "b", "a"]
    assert [i["name"] for i in sort_instances(items, SortKey.mem)] == ["b", "c", "a"]
    assert [i["name"] for i in sort_instances(items, SortKey.name)] == ["a", "b", "c"]
    raw = [i.model_dump(mode="json") for i in items]  # what `corral top` gets from the server
    assert sort_instances(raw, SortKey.cpu) == sort_instances(items, SortKey.cpu)
    host = HostView(name="host1", address="127.0.0.1", state="up", cores=2, memory_bytes=1,
                    disk_bytes=1, drivers={"process": {}}, reserved=Resources(cpus=1,
                    memory_bytes=1), free=Resources(cpus=1, memory_bytes=0), instances=3,
                    usage=Usage(cpu_core_pct=104.0, cpu_host_pct=52.0), rest_host_pct=8.0)
    assert host_summary(host) == ("host1 (up, 2 cores): instances 52.0%  rest 8.0%  "
                                  "idle 40.0%  3 inst")
    assert host_summary(host.model_dump(mode="json")) == host_summary(host)


def _drawn(table: object) -> str:
    console, buf = _console()
    console.print(table)
    return buf.getvalue()


def test_tables_from_the_servers_json_match_those_from_models() -> None:
    """The CLI draws from the JSON it received; the tour (and scripts) from wire models."""
    items = [_inst("b", 5.0, 10), _inst("a", None, None)]
    raw = [i.model_dump(mode="json") for i in items]
    assert _drawn(render.instances_table(raw)) == _drawn(render.instances_table(items))
    assert _drawn(render.instance_details(raw[0])) == _drawn(render.instance_details(items[0]))
    assert "5.0" in _drawn(render.instances_table(raw))


def test_errors_on_a_pipe_are_written_as_rich_would(capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    """Without a terminal, errors are plain text (no Rich to import), the same text."""
    exc = NoCapacity("no host\tcan take 8 cpus", hint="free some", details={
        "shortfall": {"host1": {"cpus": 6.0}}})
    console, buf = _console()
    assert render.report_error(exc, console) == 6
    assert render.report_error(exc) == 6
    assert capsys.readouterr().err == buf.getvalue()


def test_json_is_plain(capsys: pytest.CaptureFixture[str]) -> None:
    render.print_json([_inst("a", 1.0, 2)])
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    assert json.loads(out)[0]["usage"]["cpu_core_pct"] == 1.0
