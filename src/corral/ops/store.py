"""Durable operation records (one row per operation, steps and blackboard as JSON).

The engine writes the record after every step transition, so after a crash the row says exactly
which steps finished, which one was in flight, and what the steps had learned (``data``), which is
all a resumed engine needs to finish or undo the operation.
"""

from __future__ import annotations

import builtins
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import sqlalchemy as sa


class OpState(StrEnum):
    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    #: an undo failed, or a step past the point of no return kept failing: a person must look
    NEEDS_ATTENTION = "needs_attention"


FINISHED: frozenset[OpState] = frozenset(
    {OpState.SUCCEEDED, OpState.ROLLED_BACK, OpState.NEEDS_ATTENTION}
)


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    UNDOING = "undoing"
    UNDONE = "undone"
    UNDO_FAILED = "undo_failed"


@dataclass
class StepRecord:
    name: str
    state: StepState = StepState.PENDING
    started_at: float | None = None
    ended_at: float | None = None
    error: str = ""


@dataclass
class OpRecord:
    kind: str
    target: str
    params: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: OpState = OpState.RUNNING
    steps: list[StepRecord] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    hooks: list[dict[str, Any]] = field(default_factory=list)
    #: the kind's typed result, once the operation has ended (see ``Kind.result_of``)
    result: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "target": self.target, "params": self.params,
            "state": self.state.value, "data": self.data, "error": self.error,
            "hooks": self.hooks, "result": self.result,
            "created_at": self.created_at, "updated_at": self.updated_at,
            "steps": [
                {"name": s.name, "state": s.state.value, "started_at": s.started_at,
                 "ended_at": s.ended_at, "error": s.error}
                for s in self.steps
            ],
        }


metadata = sa.MetaData()
operations = sa.Table(
    "operations",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("target", sa.String(255), nullable=False, index=True),
    sa.Column("state", sa.String(32), nullable=False, index=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


def _from_body(body: str) -> OpRecord:
    raw = json.loads(body)
    rec = OpRecord(kind=raw["kind"], target=raw["target"], params=raw["params"], id=raw["id"])
    rec.state = OpState(raw["state"])
    rec.data, rec.error, rec.hooks = raw["data"], raw["error"], raw["hooks"]
    rec.result = raw.get("result")
    rec.created_at, rec.updated_at = raw["created_at"], raw["updated_at"]
    rec.steps = [
        StepRecord(s["name"], StepState(s["state"]), s["started_at"], s["ended_at"], s["error"])
        for s in raw["steps"]
    ]
    return rec


class OperationStore:
    """Operation rows in the server's database (SQLite or PostgreSQL, same code)."""

    def __init__(self, engine: sa.Engine, create: bool = False,
                 fence: Callable[[sa.Connection], None] | None = None) -> None:
        """``fence(conn)`` runs first in every write transaction and raises to refuse it (the
        control plane's leader check: a deposed leader's operations record nothing)."""
        self.engine = engine
        self.fence = fence
        if create:
            metadata.create_all(engine)

    def save(self, rec: OpRecord) -> None:
        rec.updated_at = time.time()
        values = {
            "kind": rec.kind, "target": rec.target, "state": rec.state.value,
            "body": json.dumps(rec.to_dict()), "created_at": rec.created_at,
            "updated_at": rec.updated_at,
        }
        with self.engine.begin() as conn:
            if self.fence is not None:
                self.fence(conn)
            done = conn.execute(
                operations.update().where(operations.c.id == rec.id).values(**values)
            )
            if done.rowcount == 0:
                conn.execute(operations.insert().values(id=rec.id, **values))

    def get(self, op_id: str) -> OpRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(operations.c.body).where(operations.c.id == op_id)
            ).first()
        return _from_body(row[0]) if row else None

    def list(self, target: str | None = None, limit: int = 100) -> list[OpRecord]:
        q = sa.select(operations.c.body).order_by(operations.c.created_at.desc()).limit(limit)
        if target is not None:
            q = q.where(operations.c.target == target)
        with self.engine.connect() as conn:
            return [_from_body(r[0]) for r in conn.execute(q)]

    def unfinished(self) -> builtins.list[OpRecord]:
        q = sa.select(operations.c.body).where(
            operations.c.state.in_([OpState.RUNNING.value, OpState.ROLLING_BACK.value])
        ).order_by(operations.c.created_at)
        with self.engine.connect() as conn:
            return [_from_body(r[0]) for r in conn.execute(q)]
