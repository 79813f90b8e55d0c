"""The house's layers, as docs/architecture.md draws them, held by a test of every import.

Every ``import`` and ``from ... import`` in src/corral is read (at any depth: an import inside a
function counts too), so a shortcut across a layer fails here instead of in a review. The rules:

- the server (control/) and the agent (agent/) never import each other; the agent takes only the
  host side of ha/ (addresses, reconcile planning), never the HA manager, which is the server's;
- the low layers (drivers, disks, images, bus, ops, scheduling) import only errors, besides
  themselves: each can be tested and replaced on its own;
- the wire package (api/) imports only errors and the image store's record encoding;
- the CLI talks to a fleet only through api/, and to the local fleet tool (rig/) for ``up`` and
  ``down``; the few commands that run something in their own process (a log sink, a local image
  import) are listed below with why, and the daemons (``corral server``, ``corral agent``) are
  imported by name only when one of them is started.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import corral

SRC = Path(corral.__file__).parent
LOW = {"drivers", "disks", "images", "bus", "ops", "scheduling"}

#: (CLI module, what it may import besides api/errors/cli/rig.context): why
CLI_EXCEPTIONS = {
    ("corral.cli.fleet_cmds", "corral.rig"): "corral up/down run the local fleet tool",
    ("corral.cli.fleet_cmds", "corral.rig.tour"): "corral up --tour",
    ("corral.cli.fleet_cmds", "corral.config"): "corral server/agent read their layered settings",
    ("corral.cli.logs", "corral.telemetry.logsink"): "corral logsink is a sink in this process",
    ("corral.cli.images", "corral.images.packstore"): "image import chunks a tree locally",
    ("corral.cli.images", "corral.images.transfer"): "image import uploads what is missing",
    ("corral.cli.images", "corral.images.oci"): "image pull: skopeo, the layers and the "
                                                "upload run next to the operator's files",
    ("corral.cli.images", "corral.images.oci_push"): "image push: skopeo and the layer are "
                                                     "made next to the operator's files",
    ("corral.cli.systemd_cmd", "corral.systemd"): "corral systemd print writes a unit shipped "
                                                  "as package data",
}


def module_of(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> Iterator[tuple[str, str]]:
    """(importing module, imported corral module or name) for every import in the package."""
    for path in sorted(SRC.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        mod = module_of(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("corral"):
                        yield mod, alias.name
            elif (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                  and node.module.startswith("corral")):
                yield mod, node.module
                for alias in node.names:  # "from corral.control import fleet"
                    yield mod, f"{node.module}.{alias.name}"


def package(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_server_and_the_agent_never_import_each_other() -> None:
    bad = [(a, b) for a, b in imports()
           if (package(a) == "control" and package(b) == "agent")
           or (package(a) == "agent" and (package(b) == "control"
                                          or within(b, "corral.ha.manager")))]
    assert not bad, bad


def test_low_layers_import_only_errors() -> None:
    bad = [(a, b) for a, b in imports()
           if package(a) in LOW and package(b) not in {package(a), "errors"}
           and b != "corral"]
    assert not bad, bad


def test_the_wire_package_stands_alone() -> None:
    bad = [(a, b) for a, b in imports()
           if package(a) == "api" and package(b) not in {"api", "errors"}
           and not within(b, "corral.images.records") and not within(b, "corral.__version__")
           and b != "corral"]
    assert not bad, bad


def test_the_cli_talks_through_the_api() -> None:
    allowed = ("corral.api", "corral.errors", "corral.cli", "corral.rig.context")
    bad = []
    for a, b in imports():
        if package(a) != "cli" or b == "corral" or any(within(b, p) for p in allowed):
            continue
        if not any(a == m and within(b, t) for m, t in CLI_EXCEPTIONS):
            bad.append((a, b))
    assert not bad, bad


def test_the_rules_see_real_imports() -> None:
    """The reader is not blind: it finds the imports the rules are about."""
    found = set(imports())
    assert ("corral.control.server", "corral.control.fleet") in found
    assert any(a == "corral.agent.daemon" and within(b, "corral.drivers") for a, b in found)
    assert any(a == "corral.cli.logs" and b == "corral.telemetry.logsink" for a, b in found)
