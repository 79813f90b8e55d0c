"""Shelving over HTTP: ``POST /v1/instances/{name}/shelve`` and ``.../unshelve`` (202 + the
operation, followed with ``GET /v1/ops/{id}`` like every operation) and ``GET /v1/shelves``.

Bulk unshelve is many single unshelves: the client keeps a bounded number in flight (``corral
unshelve --all``), so every instance has its own operation, its own rollback and its own line in
the result, and a slow host holds up only what goes to it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from corral.api.models import OperationView, ShelfView, ShelveRequest, UnshelveRequest
from corral.control.operations import Operations
from corral.control.ops_api import view
from corral.control.service import InstanceService
from corral.control.shelve import KIND as SHELVE
from corral.control.shelves import Shelves
from corral.control.unshelve import KIND as UNSHELVE


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

    @r.get("/v1/shelves", dependencies=auth)
    async def list_shelves() -> list[ShelfView]:
        return shelves.views()

    return r
