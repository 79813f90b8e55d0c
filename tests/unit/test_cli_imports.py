"""Starting the CLI loads what the command needs and nothing of the server (issue 9, item 7).

Operators type ``corral ls`` all day, and imports were most of its wall time: every command used
to load FastAPI (through the image HTTP module), the image store and every other command's
module. These tests run the real entry point in a fresh interpreter, so a module-level import
added anywhere on a command's path shows up here, not as a slow CLI months later.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from collections import defaultdict

import pytest

import corral.cli
from corral.cli.app import COMMANDS, module_commands
from corral.cli.main import run_cli

#: packages that belong to the server and agents; no client command may load them
SERVER_SIDE = ("fastapi", "starlette", "sqlalchemy", "nats", "uvicorn", "alembic",
               "corral.control", "corral.agent")

#: cheap commands, as typed; the first one runs in a fresh interpreter, so what it loads is
#: exactly what starting the CLI for it costs
CHEAP = [
    ["ls", "--json"],
    ["ls"],
    ["show", "web"],
    ["status"],
    ["host", "ls"],
    ["top", "--once"],
    ["events"],
    ["logs", "web"],
    ["traffic", "web", "--once"],
    ["ops", "ls"],
    ["shelved"],
    ["standby", "ls"],
    ["image", "ls"],
    ["ls", "--help"],
    ["--help"],
]

#: ``corral ls`` needs the entry point, the root group, its own module and what that imports
LS_MODULES = {"corral.cli", "corral.cli.main", "corral.cli.app", "corral.cli.instances",
              "corral.cli.render", "corral.cli.parse"}

# Each command runs through the console-script entry (``main``, which exits), and the modules
# it added to ``sys.modules`` are recorded (the first one's include the entry point's own);
# stdout and stderr are the commands' own, so the record goes to a file.
PROBE = """
import json, sys
before = set(sys.modules)
from corral.cli import main as entry
out, commands = sys.argv[1], json.loads(sys.argv[2])
records = []
for argv in commands:
    sys.argv = ["corral", *argv]
    try:
        entry.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    records.append({"argv": argv, "code": code, "new": sorted(set(sys.modules) - before)})
    before = set(sys.modules)
with open(out, "w") as f:
    json.dump(records, f)
"""


def _server_side(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in SERVER_SIDE)]


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("cli-imports")
    env = dict(os.environ, CORRAL_URL="http://127.0.0.1:1", CORRAL_TOKEN="t",
               CORRAL_CONTEXT=str(tmp / "none.json"))
    out = tmp / "records.json"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out), json.dumps(CHEAP)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert out.exists(), proc.stderr[-2000:]
    result: list[dict[str, object]] = json.loads(out.read_text())
    return result


def test_cheap_commands_load_nothing_of_the_server(records: list[dict[str, object]]) -> None:
    # no server at port 1: every command fails fast after building its client (exit 1),
    # except the help screens (exit 0), so each has gone through its whole import path
    assert [r["code"] for r in records] == [1] * (len(CHEAP) - 2) + [0, 0]
    loaded = {" ".join(map(str, r["argv"])): _server_side(r["new"])  # type: ignore[arg-type]
              for r in records}
    assert loaded == {" ".join(argv): [] for argv in CHEAP}


def test_ls_loads_only_its_own_command_module(records: list[dict[str, object]]) -> None:
    first = records[0]
    assert first["argv"] == ["ls", "--json"]
    cli_modules = {m for m in first["new"] if m.startswith("corral.cli")}  # type: ignore[attr-defined]
    assert cli_modules == LS_MODULES
    # the API client (and its wire models) is what ls talks through
    assert "corral.api.client" in first["new"]  # type: ignore[operator]


def test_every_command_is_in_the_table() -> None:
    """A command defined in a module but missing from ``COMMANDS`` could never be run."""
    by_module: dict[str, set[str]] = defaultdict(set)
    for name, module in COMMANDS.items():
        by_module[module].add(name)
    for module, names in by_module.items():
        assert set(module_commands(module)) == names, module
    for info in pkgutil.iter_modules(corral.cli.__path__):
        if info.name == "__main__":
            continue
        mod = importlib.import_module(f"corral.cli.{info.name}")
        if hasattr(mod, "commands"):
            assert info.name in by_module, f"corral.cli.{info.name} is not in COMMANDS"


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert run_cli(["--help"]) == 0
    text = capsys.readouterr().out
    listed = {line.split()[1] for line in text.splitlines()
              if line.startswith("│ ") and len(line.split()) > 2}
    assert set(COMMANDS) <= listed
    assert "List instances with their CPU" in text
    assert "Hosts of the fleet." in text
