"""Enrolling and removing hosts over HTTP: ``POST /v1/hosts`` (a join token),
``POST /v1/hosts/{name}/join`` (the agent trades it for its identity) and
``DELETE /v1/hosts/{name}`` (revoke and forget)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from corral.api.hosts import HOST_PATTERN, Enrolled, HostAdd, HostJoin, JoinGrant
from corral.control.enroll import Enrollment
from corral.errors import InvalidRequest


def router(enrollment: Enrollment, auth: list[Any]) -> APIRouter:
    r = APIRouter(tags=["fleet"])

    @r.post("/v1/hosts", dependencies=auth, status_code=201)
    async def add(body: HostAdd) -> JoinGrant:
        """A one-time join token for a host, good for an hour (shown once)."""
        g = enrollment.add(body.name)
        return JoinGrant(host=g.host, token=g.token, expires_at=g.expires_at)

    @r.post("/v1/hosts/{name}/join", status_code=201,
            responses={401: {"description": "no valid join token for that host"}})
    def join(name: str, body: HostJoin) -> Enrolled:
        """The agent's first start: its join token for its bus identity (no bearer token;
        the join token is the credential, good once). A plain ``def``: signing and the bus's
        reload run in the thread pool, not on the event loop."""
        _check(name)
        e = enrollment.join(name, body.token, body.public_key, body.csr, body.address)
        return Enrolled(host=e.host, nats_url=e.nats_url, ca_pem=e.ca_pem,
                        ticket_key=e.ticket_key, cert_pem=e.cert_pem, api_token=e.api_token)

    @r.delete("/v1/hosts/{name}", dependencies=auth, status_code=204)
    def remove(name: str) -> Response:
        """Revoke the host's identity (its bus connection is closed) and forget it; refused
        while instances or standbys are still there."""
        _check(name)
        enrollment.remove(name)
        return Response(status_code=204)

    return r


def _check(name: str) -> None:
    import re

    if not re.match(HOST_PATTERN, name):
        raise InvalidRequest(f"host name {name!r} is not valid",
                             hint="letters, digits, '_' or '-', at most 63 characters")
