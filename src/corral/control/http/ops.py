"""Operations over HTTP: ``GET /v1/ops``, ``GET /v1/ops/{id}`` and the first operation kind,
``POST /v1/instances/{name}/recreate``.

A POST that starts an operation answers 202 with the operation as first recorded; clients follow
it with ``GET /v1/ops/{id}`` (``corral recreate`` does), so no HTTP request has to outlive a
multi-step action and a server restart in the middle loses nothing but the connection.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from corral.api.models import OperationView, RecreateRequest, StepView
from corral.control.instances import InstanceService
from corral.control.operations.recreate import KIND as RECREATE
from corral.control.operations.runner import Operations
from corral.errors import NotFound
from corral.ops.store import FINISHED, OpRecord


def view(rec: OpRecord) -> OperationView:
    return OperationView(
        id=rec.id, kind=rec.kind, target=rec.target, state=rec.state.value,
        finished=rec.state in FINISHED, params=rec.params, data=rec.data, error=rec.error,
        hooks=rec.hooks, result=rec.result, created_at=rec.created_at,
        updated_at=rec.updated_at,
        steps=[StepView(name=s.name, state=s.state.value, started_at=s.started_at,
                        ended_at=s.ended_at, error=s.error) for s in rec.steps],
    )


def router(ops: Operations, service: InstanceService, auth: list[Any]) -> APIRouter:
    r = APIRouter(tags=["operations"])

    @r.get("/v1/ops", dependencies=auth)
    async def list_ops(
        target: Annotated[str | None, Query(description="only this instance's operations")
                          ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> list[OperationView]:
        return [view(rec) for rec in ops.store.list(target=target, limit=limit)]

    @r.get("/v1/ops/{op_id}", dependencies=auth)
    async def get_op(op_id: str) -> OperationView:
        rec = ops.store.get(op_id)
        if rec is None:
            raise NotFound(f"no operation with id '{op_id}'", hint="see 'corral ops ls'")
        return view(rec)

    @r.post("/v1/instances/{name}/recreate", dependencies=auth, tags=["instances"],
            status_code=202)
    async def recreate(name: str, body: RecreateRequest | None = None) -> OperationView:
        service.get(name)  # 404 before anything is recorded
        params = {"to": body.to if body is not None else None}
        return view(await ops.begin(RECREATE, name, params))

    return r
