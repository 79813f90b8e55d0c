"""JSON encoding of bus payloads."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def encode(msg: BaseModel) -> bytes:
    return msg.model_dump_json().encode()


def decode(data: bytes, model: type[M]) -> M:
    return model.model_validate_json(data)
