"""API tokens over HTTP: ``POST /v1/tokens``, ``GET /v1/tokens``, ``DELETE /v1/tokens/{name}``.

Admin only, GET included (the guard's table says so): who holds which kind of key is the
admin's business. A new token is in the answer of its POST and nowhere else, ever.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from corral.api.models import TokenCreate, TokenCreated, TokenView
from corral.api.names import TOKEN_NAME_PATTERN
from corral.control.tokens import TokenStore
from corral.errors import Conflict, NotFound


def router(store: TokenStore, auth: list[Any]) -> APIRouter:
    r = APIRouter(tags=["tokens"])

    @r.post("/v1/tokens", dependencies=auth, status_code=201)
    async def create(body: TokenCreate) -> TokenCreated:
        """A new named token with a role; the answer holds the token, shown this once."""
        token = store.create(body.name, body.role)
        view = next((t for t in store.list() if t.name == body.name), None)
        if view is None:  # revoked between the two lines by another request
            raise Conflict(f"token '{body.name}' was revoked as it was made",
                           hint="create it again")
        return TokenCreated(**view.model_dump(), token=token)

    @r.get("/v1/tokens", dependencies=auth)
    async def list_tokens() -> list[TokenView]:
        """Every stored token (the fleet token is not one of them), without secrets."""
        return store.list()

    @r.delete("/v1/tokens/{name}", dependencies=auth, status_code=204)
    async def revoke(name: Annotated[str, Path(pattern=TOKEN_NAME_PATTERN)]) -> Response:
        """Revoke a token: the next request carrying it is refused."""
        if not store.revoke(name):
            raise NotFound(f"no token named '{name}'", hint="see 'corral token ls'")
        return Response(status_code=204)

    return r
