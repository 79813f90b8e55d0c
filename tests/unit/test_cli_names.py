"""Hostile names on the command line (issue 10, item 4): a name that could never be valid (a
'/', '..', a newline, unicode, too long, a leading '-') is refused by the CLI itself with exit
2 and the command's usage, before any connection is made (the URL points at a closed port, so
a request would fail differently)."""

from __future__ import annotations

import socket

import pytest

from corral.api import names
from corral.cli.main import run_cli

BAD = ["a/b", "../x", "a\nb", "ünï", "x" * 300, "Web", "a b"]


@pytest.fixture(autouse=True)
def nowhere(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CORRAL_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CORRAL_TOKEN", "t")
    monkeypatch.setenv("CORRAL_CONTEXT", f"{tmp_path}/none.json")


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("argv", [
    ["show", "{instance}"], ["stop", "web", "{instance}"], ["rm", "{instance}"],
    ["logs", "{instance}"], ["migrate", "{instance}"], ["shelve", "{instance}"],
    ["unshelve", "{instance}"], ["traffic", "{instance}"], ["run", "{instance}", "--", "true"],
    ["migrate", "web", "--to", "{host}"], ["recreate", "web", "--to", "{host}"],
    ["standby", "add", "web", "--host", "{host}"], ["run", "web", "--host", "{host}", "--", "x"],
    ["run", "web", "--image", "{image}", "--", "true"], ["image", "rm", "{image}"],
    ["token", "create", "{token}"], ["token", "rm", "{token}"],
])
def test_a_hostile_name_is_exit_2(argv: list[str], bad: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    (slot,) = [a for a in argv if a.startswith("{")]
    kind = slot.strip("{}")
    if names.valid(kind, bad):
        pytest.skip(f"{bad!r} is a valid {kind} name")
    code = run_cli([bad if a == slot else a for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{kind} name" in err and "not valid" in err and "usage:" in err


@pytest.mark.parametrize("path", ["/srv/a\nb", "/srv/\x1b[31m", "/" + "a" * 5000])
def test_a_hostile_path_is_exit_2(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(["run", "web", "--from", path, "--", "true"])
    assert code == 2 and "path" in capsys.readouterr().err


def test_a_token_in_the_environment_wins_over_the_context(
        monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    """CORRAL_TOKEN without CORRAL_URL: the context's fleet, with the token given (a read-only
    token must not be quietly replaced by the admin token ``corral up`` saved)."""
    from corral.rig.context import FleetContext, resolve, save_context

    monkeypatch.delenv("CORRAL_URL")
    save_context(FleetContext(url="http://a:1", token="admin-token"))
    assert resolve() == ("http://a:1", "t")
    monkeypatch.delenv("CORRAL_TOKEN")
    assert resolve() == ("http://a:1", "admin-token")
