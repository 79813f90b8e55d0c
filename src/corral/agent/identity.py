"""This host's identity: made once, kept in ``DATA/identity`` (0700, secrets 0600).

At first start the agent makes its bus key (an nkey seed, which never leaves the host) and,
when the fleet speaks TLS, a private key and a certificate request for its data channel; it
trades a one-time join token for them at the server (``POST /v1/hosts/NAME/join``), which lists
the key on the bus and signs the certificate. What comes back (where the bus is, the fleet's CA,
the key that signs transfer tickets, the API token the host may use) is kept here, so every later
start logs in with its own identity and needs no token at all.

An agent given the fleet's admin token instead of a join token asks for a join token itself
(``corral up`` does the same for the hosts it starts, with join tokens); an agent with neither
and no identity logs in to a bus of its own with the token it has (tests, tools).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from corral.bus import identity as bus_identity
from corral.bus.identity import Credentials
from corral.errors import ConfigError

log = logging.getLogger(__name__)

DIR = "identity"


@dataclass(frozen=True)
class Identity:
    host: str
    seed: str
    nats_url: str
    #: the fleet's CA (empty: the fleet does not speak TLS)
    ca_file: str
    #: the public key transfer tickets are signed with (hex; empty without TLS)
    ticket_key: str
    #: this host's certificate and key for the data channel (empty without TLS)
    cert_file: str
    key_file: str
    #: the token this host uses on the API (image fetches and uploads)
    api_token: str = ""

    def credentials(self) -> Credentials:
        return Credentials(seed=self.seed, ca_file=self.ca_file,
                           inbox_prefix=bus_identity.inbox(self.host))


def _private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(data_dir: Path, host: str) -> Identity | None:
    """The identity kept here, if this host has enrolled (as ``host``)."""
    d = data_dir / DIR
    try:
        raw = json.loads((d / "identity.json").read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ConfigError(f"{d / 'identity.json'} is damaged: {exc}",
                          hint="remove DATA/identity and enroll the host again") from exc
    if raw.get("host") != host:
        raise ConfigError(f"this data dir holds the identity of host {raw.get('host')!r}, "
                          f"not {host!r}", hint="start the agent with its own name and data dir")
    seed = bus_identity.read_seed(d / "host.nk")
    if not seed:
        raise ConfigError(f"{d / 'host.nk'} is missing or empty",
                          hint="remove DATA/identity and enroll the host again")
    return Identity(seed=seed, **{k: v for k, v in raw.items() if k != "seed"})


def enroll(data_dir: Path, host: str, server_url: str, join_token: str, address: str,
           ca_file: str = "", admin_token: str = "") -> Identity:
    """Trade a join token (or, given the fleet's admin token, one asked for now) for this
    host's identity, and keep it."""
    from corral.api.client import Client

    bus_identity.check_host(host)
    d = data_dir / DIR
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    seed = bus_identity.read_seed(d / "host.nk") or bus_identity.new_seed()
    _private(d / "host.nk", (seed + "\n").encode())  # before the trade: a retry uses the same
    key_path = d / "host.key"
    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        _private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
           .sign(key, hashes.SHA256()))
    with Client(server_url, admin_token, ca_file=ca_file or None) as client:
        if not join_token:
            if not admin_token:
                raise ConfigError(f"host {host} has no identity yet and no join token",
                                  hint=f"on the server: corral host add {host}; then start "
                                       "this agent with --join TOKEN --server URL")
            log.warning("enrolling with the fleet's admin token; a join token ('corral host "
                        "add %s') keeps that token off this host", host)
            join_token = str(client.host_add(host)["token"])
        got = client.host_join(host, join_token, bus_identity.public_key(seed),
                               csr.public_bytes(serialization.Encoding.PEM).decode(), address)
    cert_file = ca_path = ""
    if got.get("ca_pem"):
        ca_path = str(d / "ca.crt")
        Path(ca_path).write_text(str(got["ca_pem"]))
    if got.get("cert_pem"):
        cert_file = str(d / "host.crt")
        Path(cert_file).write_text(str(got["cert_pem"]))
    ident = Identity(host=host, seed=seed, nats_url=str(got["nats_url"]), ca_file=ca_path,
                     ticket_key=str(got.get("ticket_key") or ""), cert_file=cert_file,
                     key_file=str(key_path) if cert_file else "",
                     api_token=str(got.get("api_token") or ""))
    _private(d / "identity.json", json.dumps(
        {k: v for k, v in asdict(ident).items() if k != "seed"}, indent=1).encode())
    log.warning("host %s enrolled: it logs in to the bus with its own key from now on", host)
    return ident
