"""Wire models of host enrollment: ``corral host add`` and an agent trading its join token."""

from __future__ import annotations

from pydantic import BaseModel, Field

HOST_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"


class HostAdd(BaseModel):
    """``POST /v1/hosts``: make a one-time join token for a host."""

    name: str = Field(pattern=HOST_PATTERN, description="the host's name (its bus identity)")


class JoinGrant(BaseModel):
    """The join token, shown once; the agent trades it at its first start."""

    host: str
    token: str
    expires_at: float


class HostJoin(BaseModel):
    """``POST /v1/hosts/{name}/join``: the agent's side of the trade (no bearer token: the
    join token is the credential)."""

    token: str = Field(min_length=8, max_length=256)
    public_key: str = Field(pattern=r"^U[A-Z2-7]{55}$",
                            description="the public half of the nkey the agent made")
    csr: str = Field(default="", max_length=16_384,
                     description="PEM certificate request for its data channel (TLS on)")
    address: str = Field(default="127.0.0.1", max_length=255,
                         description="the address other hosts reach it at")


class Enrolled(BaseModel):
    """What the agent needs from then on: where the bus is, what to trust, its certificate."""

    host: str
    nats_url: str
    ca_pem: str = ""
    ticket_key: str = ""
    cert_pem: str = ""
    #: the API token this host uses (image fetches and shelving uploads)
    api_token: str = ""
