"""Starting the CLI loads what the command needs and nothing more (issue 9, item 7).

Operators type ``corral ls`` all day, and imports were most of its wall time: Typer (with Click
and Rich's help screens), httpx (with httpcore, anyio, certifi), pydantic for the wire models,
and once FastAPI. The contract pinned here: a command that prints JSON or plain lines loads
none of them, nor anything of the server or the agent; a command that draws a table may load
Rich and the wire models (pydantic), still nothing of the server. The commands run through the
real entry point in a fresh interpreter against a small fake server, so a module-level import
added anywhere on a command's path shows up here, not as a slow CLI months later.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from corral.cli.app import build_parser, parse
from corral.cli.main import run_cli
from corral.cli.table import COMMANDS, Command, Group

#: what no client command may load: the server's and agent's packages
SERVER_SIDE = ("fastapi", "starlette", "sqlalchemy", "nats", "uvicorn", "alembic",
               "corral.control", "corral.agent")
#: what the CLI no longer uses at all
DROPPED = ("typer", "click", "httpx", "httpcore", "anyio", "certifi", "h11")
#: what only commands that draw tables (Rich) or build wire models (pydantic) may load
TABLE_ONLY = ("rich", "pygments", "markdown_it", "pydantic", "pydantic_core",
              "corral.api.models")
#: the image store's chunking (lmdb, zstd, blake3): ``image import`` alone
IMPORT_ONLY = ("corral.images.packstore", "corral.images.tree", "lmdb", "zstandard", "blake3")

#: commands that print JSON or plain lines, as typed; the first runs in a fresh interpreter,
#: so what it loads is exactly what starting the CLI for it costs
CHEAP = [
    ["ls", "--json"],
    ["show", "web", "--json"],
    ["status", "--json"],
    ["host", "ls", "--json"],
    ["top", "--json"],
    ["events"],
    ["events", "--json"],
    ["logs", "web"],
    ["logs", "web", "--json"],
    ["traffic", "web", "--json"],
    ["ops", "ls", "--json"],
    ["ops", "show", "op1", "--json"],
    ["shelved", "--json"],
    ["standby", "ls", "--json"],
    ["image", "ls", "--json"],
    ["start", "web"],
    ["stop", "web", "--json"],
    ["rm", "web"],
    ["image", "rm", "old"],
    ["ls", "--help"],
    ["image", "--help"],
    ["--help"],
]
#: commands that draw tables (run after every cheap one)
TABLES = [["ls"], ["show", "web"], ["status"], ["host", "ls"], ["top", "--once"],
          ["traffic", "web", "--once"], ["ops", "ls"], ["ops", "show", "op1"], ["shelved"],
          ["standby", "ls"], ["image", "ls"]]

#: ``corral ls --json`` needs the entry point, the table, its own command module, the client
LS_MODULES = {"corral", "corral.errors", "corral.cli", "corral.cli.main", "corral.cli.app",
              "corral.cli.table", "corral.cli.render", "corral.cli.instances", "corral.api",
              "corral.api.client", "corral.api.transport", "corral.rig", "corral.rig.context"}

USAGE = {"cpu_core_pct": 12.5, "cpu_host_pct": 6.25, "memory_bytes": 1 << 20,
         "sampled_at": 1.0}
INSTANCE = {"name": "web", "host": "host1", "driver": "process", "command": ["sleep", "9"],
            "cpus": 0.5, "memory_bytes": 1 << 26, "rootfs": None, "image": None, "tail": {},
            "vip": None, "desired_state": "running", "state": "running", "pid": 42,
            "exit_code": None, "epoch": 1, "created_at": 1.0, "updated_at": 2.0,
            "usage": USAGE, "allowed": ["stop"], "disk_host": None, "shelf": None}
HOST = {"name": "host1", "address": "127.0.0.1", "state": "up", "cores": 2,
        "memory_bytes": 1 << 30, "disk_bytes": 1 << 30, "drivers": {"process": {}},
        "reserved": {"cpus": 0.5, "memory_bytes": 1}, "free": {"cpus": 1.5, "memory_bytes": 9},
        "instances": 1, "usage": USAGE, "rest_host_pct": 3.0, "last_heartbeat": 1.0,
        "lease_expires_at": 9.0, "agent_version": "0.1.0"}
STATUS = {"version": "0.1.0", "hosts_up": 1, "hosts_down": 0, "instances": {"running": 1},
          "nats_url": "nats://127.0.0.1:4222", "db": "sqlite"}
OP = {"id": "op1", "kind": "recreate", "target": "web", "state": "succeeded", "finished": True,
      "params": {}, "data": {}, "error": None, "hooks": [],
      "steps": [{"name": "plan", "state": "done", "started_at": 1.0, "ended_at": 2.0,
                 "error": ""}], "created_at": 1.0, "updated_at": 2.0}
EVENT = {"index": 7, "type": "instance.state", "ts": 1.5, "host": "host1", "instance": "web",
         "data": {"from": "created", "to": "running", "cause": "verb"}}
LOG = {"ts": 1.5, "host": "host1", "source": "stdout", "seq": 1, "line": "hello"}
TRAFFIC = {"instance": "web", "at": 1.0, "lines": 3, "hits": 3, "bad_lines": 0, "online": 1,
           "online_window_s": 300.0, "windows": [], "top_urls": [], "url": None,
           "url_online": None, "clients": []}
SHELF = {"name": "db", "driver": "process", "cpus": 0.5, "memory_bytes": 1 << 26}
STANDBY = {"instance": "web", "host": "host2", "every_seconds": 60.0, "state": "ready"}
IMAGE = {"name": "base", "manifest": "ab" * 32, "files": 3, "size": 100, "unique_size": 10,
         "stored_size": 50, "dedup_ratio": 2.0}

ROUTES: dict[tuple[str, str], Any] = {
    ("GET", "/v1/instances"): [INSTANCE],
    ("GET", "/v1/instances/web"): INSTANCE,
    ("POST", "/v1/instances/web/start"): INSTANCE,
    ("POST", "/v1/instances/web/stop"): {**INSTANCE, "state": "stopped"},
    ("DELETE", "/v1/instances/web"): None,
    ("GET", "/v1/status"): STATUS,
    ("GET", "/v1/hosts"): [HOST],
    ("GET", "/v1/instances/web/traffic"): TRAFFIC,
    ("GET", "/v1/ops"): [OP],
    ("GET", "/v1/ops/op1"): OP,
    ("GET", "/v1/shelves"): [SHELF],
    ("GET", "/v1/standbys"): [STANDBY],
    ("GET", "/v1/images"): [IMAGE],
    ("DELETE", "/v1/images/old"): None,
    ("GET", "/v1/events"): [EVENT],  # NDJSON
    ("GET", "/v1/instances/web/logs"): [LOG],  # NDJSON
}

# Each command runs through the console-script entry (``main``, which exits); the modules it
# added to ``sys.modules`` and what it printed are recorded (in a file: stdout is the
# commands' own).
PROBE = """
import contextlib, io, json, sys
out, commands = sys.argv[1], json.loads(sys.argv[2])
before = set(sys.modules)
from corral.cli import main as entry
records = []
for argv in commands:
    sys.argv = ["corral", *argv]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            entry.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    records.append({"argv": argv, "code": code, "out": buf.getvalue(),
                    "new": sorted(set(sys.modules) - before)})
    before = set(sys.modules)
with open(out, "w") as f:
    json.dump(records, f)
"""


class FakeServer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.partition("?")[0]
        if self.command == "POST" and path == "/v1/chunks/missing":
            payload: Any = {"missing": json.loads(raw)["ids"]}
        elif self.command == "POST" and path == "/v1/chunks/upload":
            payload = {"stored": 1}
        elif self.command == "PUT" and path.startswith("/v1/images/"):
            payload = IMAGE
        elif (self.command, path) in ROUTES:
            payload = ROUTES[(self.command, path)]
        else:
            payload = {"error": {"code": "not_found", "message": f"no route {path}"}}
        if path.endswith(("/events", "/logs")):
            data = b"".join(json.dumps(p).encode() + b"\n" for p in payload)
            ctype = "application/x-ndjson"
        else:
            data = b"" if payload is None else json.dumps(payload).encode()
            ctype = "application/json"
        refused = isinstance(payload, dict) and isinstance(payload.get("error"), dict)
        status = 404 if refused else 204 if payload is None else 200
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _probe(tmp: Path, url: str, commands: list[list[str]]) -> list[dict[str, Any]]:
    env = dict(os.environ, CORRAL_URL=url, CORRAL_TOKEN="t",
               CORRAL_CONTEXT=str(tmp / "none.json"), COLUMNS="120")
    env.pop("FORCE_COLOR", None)
    out = tmp / "records.json"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out), json.dumps(commands)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert out.exists(), proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr[-2000:]
    result: list[dict[str, Any]] = json.loads(out.read_text())
    return result


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory, fake_url: str) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("cli-imports")
    tree = tmp / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("hello\n")
    return _probe(tmp, fake_url, [*CHEAP, *TABLES, ["image", "import", "img", str(tree)]])


def _among(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)]


def _by_argv(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {" ".join(r["argv"]): r for r in records}


def test_every_command_succeeds(records: list[dict[str, Any]]) -> None:
    assert {" ".join(r["argv"]): r["code"] for r in records} == {
        " ".join(r["argv"]): 0 for r in records}


def test_cheap_commands_load_no_table_nor_server_code(records: list[dict[str, Any]]) -> None:
    cheap = records[:len(CHEAP)]
    assert [r["argv"] for r in cheap] == CHEAP
    loaded = {" ".join(r["argv"]): _among(r["new"], SERVER_SIDE + DROPPED + TABLE_ONLY
                                           + IMPORT_ONLY) for r in cheap}
    assert loaded == {" ".join(argv): [] for argv in CHEAP}


def test_table_commands_load_nothing_of_the_server(records: list[dict[str, Any]]) -> None:
    loaded = {" ".join(r["argv"]): _among(r["new"], SERVER_SIDE + DROPPED)
              for r in records[:-1]}
    assert loaded == {key: [] for key in loaded}
    tables = _by_argv(records)
    assert _among(tables["ls"]["new"], ("rich",))  # really drawn with Rich


def test_image_import_loads_the_chunker_not_the_web_framework(
        records: list[dict[str, Any]]) -> None:
    last = records[-1]
    assert last["argv"][:2] == ["image", "import"]
    assert "img: imported, " in last["out"]
    assert "corral.images.transfer" in last["new"]
    # fastcdc's package imports Click for its own command line: the chunker's cost, not ours
    dropped = tuple(p for p in DROPPED if p != "click")
    assert _among(last["new"], SERVER_SIDE + dropped + ("corral.images.http", "pydantic")) == []


def test_ls_loads_only_its_own_command_module(records: list[dict[str, Any]]) -> None:
    first = records[0]
    assert first["argv"] == ["ls", "--json"]
    assert {m for m in first["new"] if m.startswith("corral")} == LS_MODULES


def test_json_output_is_what_the_server_sent(records: list[dict[str, Any]],
                                            fake_url: str) -> None:
    out = _by_argv(records)
    assert json.loads(out["ls --json"]["out"]) == [INSTANCE]
    assert json.loads(out["show web --json"]["out"]) == INSTANCE
    assert json.loads(out["status --json"]["out"]) == {"url": fake_url, "status": STATUS,
                                                       "hosts": [HOST]}
    assert json.loads(out["top --json"]["out"]) == {"hosts": [HOST], "instances": [INSTANCE]}
    assert json.loads(out["ops show op1 --json"]["out"]) == OP
    assert json.loads(out["stop web --json"]["out"])["state"] == "stopped"
    # events as the server wrote them, one per line; logs one JSON object per line
    assert [json.loads(x) for x in out["events --json"]["out"].splitlines()] == [EVENT]
    assert out["logs web"]["out"] == "hello\n"
    assert json.loads(out["logs web --json"]["out"]) == LOG
    assert out["start web"]["out"] == "web: running\n"
    assert out["rm web"]["out"] == "web: deleted\n"
    assert "created -> running (verb)" in out["events"]["out"]
    assert "web" in out["ls"]["out"] and "CPU%core" in out["ls"]["out"]


# -- the table and the command functions --------------------------------------------------------


def _commands() -> Iterator[tuple[str, Command]]:
    for name, entry in COMMANDS.items():
        if isinstance(entry, Group):
            for sub, cmd in entry.commands.items():
                yield f"corral {name} {sub}", cmd
        else:
            yield f"corral {name}", entry


def test_every_command_function_takes_exactly_its_arguments() -> None:
    """A table entry and its function disagree only at run time otherwise."""
    import importlib

    for prog, cmd in _commands():
        func = getattr(importlib.import_module(f"corral.cli.{cmd.module}"), cmd.func)
        dests = {a.dest for a in build_parser(prog, cmd)._actions if a.dest != "help"}
        assert set(inspect.signature(func).parameters) == dests, prog


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert run_cli(["--help"]) == 0
    text = capsys.readouterr().out
    for name, entry in COMMANDS.items():
        assert f"  {name} " in text
        if isinstance(entry, Group):
            assert entry.help in text
            for sub, cmd in entry.commands.items():
                assert f"    {sub} " in text and cmd.help.split("\n\n")[0] in text
        else:
            assert entry.help.split("\n\n")[0] in text


def test_each_commands_help_lists_its_options(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    for prog, cmd in _commands():
        assert run_cli([*prog.split()[1:], "--help"]) == 0, prog
        text = " ".join(capsys.readouterr().out.split())
        for arg in cmd.args:
            assert " ".join(arg.help.split()) in text, (prog, arg.flags)
            for flag in arg.flags:
                assert flag in text or flag.upper() in text or arg.metavar in text, (prog, flag)


def test_groups_without_a_command_show_their_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli([]) == 2
    assert "usage: corral" in capsys.readouterr().err
    assert run_cli(["standby"]) == 2
    assert "promote" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "says"), [
    (["lss"], "did you mean 'ls'"),
    (["ls", "--bogus"], "unrecognized arguments: --bogus"),
    (["ls", "--jso"], "unrecognized arguments: --jso"),  # no abbreviations, as with Click
    (["top", "--sort", "colour"], "invalid choice: 'colour'"),
    (["unshelve", "--parallel", "65"], "65 is not in the range 1<=x<=64"),
    (["stop"], "required: NAMES"),
    (["stop", "web", "--timeout", "soon"], "invalid float value: 'soon'"),
    (["logsink"], "required: --dir"),
    (["image", "nope"], "no such command 'nope'"),
])
def test_usage_errors_exit_2_with_usage_and_hint(argv: list[str], says: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: corral")
    assert "error: " in err and says in err
    assert "hint: " in err and "--help" in err


def _run_args(argv: list[str]) -> dict[str, Any]:
    entry = COMMANDS["run"]
    assert isinstance(entry, Command)
    return parse("corral run", entry, argv)


def test_words_after_dashes_and_options_anywhere() -> None:
    """As Click read them: options before or after positionals; after ``--`` everything is
    the command's, options of the workload included."""
    args = _run_args(["web", "--cpus", "1", "-e", "A=1", "--", "sh", "-c", "exit 3", "--x"])
    assert args["name"] == "web" and args["cpus"] == 1.0 and args["env"] == ["A=1"]
    assert args["command"] == ["sh", "-c", "exit 3", "--x"]
    args = _run_args(["--memory", "8M", "web", "--", "python3", "-m", "http.server", "--", "x"])
    assert args["command"] == ["python3", "-m", "http.server", "--", "x"]
    assert args["memory"] == "8M"
    assert _run_args(["web", "sleep", "9"])["command"] == ["sleep", "9"]
    assert _run_args(["web"])["command"] == []  # refused by the command, with a hint
    rm = COMMANDS["rm"]
    assert isinstance(rm, Command)
    assert parse("corral rm", rm, ["--force", "a", "b"]) == {"names": ["a", "b"], "force": True}
    assert parse("corral rm", rm, ["-f", "--", "a"]) == {"names": ["a"], "force": True}
