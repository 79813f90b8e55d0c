"""Draining hosts over HTTP: ``POST /v1/hosts/{name}/drain`` (202 + the drain group's
operation, followed like every operation) and ``POST /v1/hosts/{name}/undrain``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from corral.api.models import DrainRequest, OperationView
from corral.control.fleet import Fleet
from corral.control.http.hosts import _check
from corral.control.http.ops import view
from corral.control.operations.drain import KIND as DRAIN
from corral.control.operations.drain import undrain
from corral.control.operations.runner import Operations


def router(ops: Operations, fleet: Fleet, auth: list[Any]) -> APIRouter:
    r = APIRouter(tags=["fleet"])

    @r.post("/v1/hosts/{name}/drain", dependencies=auth, status_code=202)
    async def drain(name: str, body: DrainRequest | None = None) -> OperationView:
        """Mark the host draining (nothing new is placed there) and move everything it holds
        elsewhere: instances (warm migration), standbys, kept disks (once in the store)."""
        _check(name)
        b = body or DrainRequest()
        return view(await ops.begin(DRAIN, name, {"deadline_seconds": b.deadline_seconds,
                                                  "parallel": b.parallel}))

    @r.post("/v1/hosts/{name}/undrain", dependencies=auth)
    async def undrain_(name: str) -> dict[str, Any]:
        """Clear the mark: the scheduler may place on the host again."""
        _check(name)
        return {"host": name, "was_draining": undrain(fleet, name)}

    return r
