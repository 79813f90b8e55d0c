"""Shelving over HTTP: ``POST /v1/instances/{name}/shelve`` and ``.../unshelve`` (202 + the
operation, followed with ``GET /v1/ops/{id}`` like every operation) and ``GET /v1/shelves``.

Bulk unshelve (``POST /v1/unshelve``) is one server-side operation group (control/group.py)
whose members are single unshelves, a bounded number in flight: every instance still has its own
operation, its own rollback and its own line in the group's result, a slow host holds up only
what goes to it, and the batch goes on if the client goes away.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter

from corral.api.models import (
    OperationView,
    ShelfView,
    ShelveRequest,
    UnshelveGroupRequest,
    UnshelveRequest,
)
from corral.control.http.ops import view
from corral.control.instances import InstanceService
from corral.control.operations.runner import Operations
from corral.control.operations.shelve import KIND as SHELVE
from corral.control.operations.unshelve import KIND as UNSHELVE
from corral.control.operations.unshelve_group import KIND as UNSHELVE_GROUP
from corral.control.shelves import Shelves
from corral.errors import InvalidRequest


def router(ops: Operations, service: InstanceService, shelves: Shelves,
           auth: list[Any]) -> APIRouter:
    r = APIRouter(tags=["shelving"])

    @r.post("/v1/instances/{name}/shelve", dependencies=auth, status_code=202)
    async def shelve(name: str, body: ShelveRequest | None = None) -> OperationView:
        """Snapshot the disk into the store, release CPU and memory, keep the disk on its host
        until the offload delay passes."""
        service.get(name)  # 404 before anything is recorded
        after = body.offload_after if body is not None else None
        return view(await ops.begin(SHELVE, name, {"offload_after": after}))

    @r.post("/v1/instances/{name}/unshelve", dependencies=auth, status_code=202)
    async def unshelve(name: str, body: UnshelveRequest | None = None) -> OperationView:
        """Back on its old host when the disk is there and it fits, else where the scheduler
        says (preferring hosts that cache more of its chunks)."""
        service.get(name)
        return view(await ops.begin(UNSHELVE, name, {"to": body.to if body else None}))

    @r.post("/v1/unshelve", dependencies=auth, status_code=202)
    async def unshelve_group(body: UnshelveGroupRequest) -> OperationView:
        """Many shelved instances back, as one operation group (its result lists each)."""
        names = list(body.names)
        if body.all:
            names += [v.name for v in shelves.views() if v.name not in names]
        if not names:
            raise InvalidRequest("nothing to unshelve", hint="name instances, or use all"
                                 if not body.all else "no instance is shelved")
        return view(await ops.begin(UNSHELVE_GROUP, f"unshelve-{uuid.uuid4().hex[:8]}", {
            "names": names, "to": body.to, "parallel": body.parallel}))

    @r.get("/v1/shelves", dependencies=auth)
    async def list_shelves() -> list[ShelfView]:
        return shelves.views()

    return r
