"""The dashboard's actions: each one is the API route the CLI calls, with the same body.

One table, so the page's buttons, the confirmation texts and the routes cannot drift apart: an
action names the API path it posts to and builds its body from the form's few fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp

from corral.control.dashboard.internal import call, path_of


def _none(_: dict[str, str]) -> dict[str, Any] | None:
    return None


def _to(form: dict[str, str]) -> dict[str, Any]:
    return {"to": form.get("to") or None}


def _standby_host(form: dict[str, str]) -> dict[str, Any]:
    return {"host": form.get("to") or None}


@dataclass(frozen=True)
class Action:
    #: what the confirmation says it does
    says: str
    #: the API path under the named resource ("" for the resource itself)
    path: tuple[str, ...]
    body: Callable[[dict[str, str]], dict[str, Any] | None] = _none
    #: a host's action (drain) rather than an instance's
    host: bool = False


ACTIONS: dict[str, Action] = {
    "start": Action("start", ("start",)),
    "stop": Action("stop", ("stop",)),
    "restart": Action("restart", ("restart",)),
    "migrate": Action("migrate (warm) to another host", ("migrate",), _to),
    "standby-add": Action("keep a warm standby of", ("standby",), _standby_host),
    "standby-sync": Action("refresh the standby of", ("standby", "sync")),
    "standby-promote": Action("promote the standby of", ("standby", "promote")),
    "shelve": Action("shelve (stop and store the disk of)", ("shelve",)),
    "unshelve": Action("unshelve", ("unshelve",), _to),
    "drain": Action("drain (move everything off) host", ("drain",), host=True),
    "undrain": Action("accept placements again on host", ("undrain",), host=True),
}


async def run_action(app: ASGIApp, token: str, action: str,
                     form: dict[str, str]) -> tuple[int, Any]:
    """(status, JSON answer) of the API call ``action`` stands for, on ``form["name"]``."""
    spec = ACTIONS[action]
    name = form.get("name", "")
    base = "/v1/hosts" if spec.host else "/v1/instances"
    return await call(app, token, "POST", path_of(base, name, *spec.path),
                      body=spec.body(form))
