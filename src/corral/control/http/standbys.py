"""Migration and standbys over HTTP. Every POST that starts an operation answers 202 with the
operation as first recorded; clients follow it with ``GET /v1/ops/{id}``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from corral.api.models import MigrateRequest, OperationView, StandbyRequest, StandbyView
from corral.control.http.ops import view
from corral.control.instances import InstanceService
from corral.control.operations.migrate import KIND as MIGRATE
from corral.control.operations.promote import KIND as PROMOTE
from corral.control.operations.runner import Operations
from corral.control.standbys import Standbys


def router(ops: Operations, service: InstanceService, standbys: Standbys, auth: list[Any]
           ) -> APIRouter:
    r = APIRouter(tags=["instances"])

    @r.post("/v1/instances/{name}/migrate", dependencies=auth, status_code=202)
    async def migrate(name: str, body: MigrateRequest | None = None) -> OperationView:
        service.get(name)  # 404 before anything is recorded
        body = body or MigrateRequest()
        return view(await ops.begin(MIGRATE, name, {"to": body.to, "cold": body.cold}))

    @r.get("/v1/standbys", dependencies=auth, tags=["standbys"])
    async def standby_list() -> list[StandbyView]:
        return [StandbyView(**standbys.view(sb)) for sb in standbys.list()]

    @r.post("/v1/instances/{name}/standby", dependencies=auth, tags=["standbys"],
            status_code=202)
    async def standby_add(name: str, body: StandbyRequest | None = None) -> OperationView:
        body = body or StandbyRequest()
        return view(await standbys.add(name, body.host, body.every_seconds))

    @r.post("/v1/instances/{name}/standby/sync", dependencies=auth, tags=["standbys"],
            status_code=202)
    async def standby_sync(name: str) -> OperationView:
        return view(await standbys.sync(name))

    @r.post("/v1/instances/{name}/standby/promote", dependencies=auth, tags=["standbys"],
            status_code=202)
    async def standby_promote(name: str) -> OperationView:
        service.get(name)
        return view(await ops.begin(PROMOTE, name, {}))

    @r.delete("/v1/instances/{name}/standby", dependencies=auth, tags=["standbys"],
              status_code=204)
    async def standby_rm(name: str) -> Response:
        await standbys.remove(name)
        return Response(status_code=204)

    return r
