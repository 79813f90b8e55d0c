"""The fleet's certificate authority, kept by the server in ``DATA/pki`` (0700, keys 0600).

One CA per fleet, made on the server's first start with TLS on: it signs the server's
certificate (the API over HTTPS and the bus over TLS) and, at enrollment, each host's
certificate from the CSR the host made (its key never leaves the host); hosts present theirs on
the data channel, where both ends check the other's name. Transfer tickets are signed by a key
of their own (``DATA/ticket.key``, :mod:`corral.disks.tickets`), made with or without TLS.
``cryptography`` does the work, as the house plan says.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corral.errors import InvalidRequest

#: certificates the CA signs are good for this long (a fleet re-enrolls long before)
VALID_DAYS = 3650


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _names(sans: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(sans):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


@dataclass
class Authority:
    """The CA and the files the server serves TLS with."""

    dir: Path

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def cert_file(self) -> Path:
        return self.dir / "server.crt"

    @property
    def key_file(self) -> Path:
        return self.dir / "server.key"

    def ensure(self, server_names: list[str]) -> None:
        """Make what is missing: the CA, the server's certificate (again when its names
        changed)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not self.ca_file.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corral fleet CA")])
            cert = (self._builder(name, name, key.public_key(), days=VALID_DAYS)
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                 False, False), critical=True)
                    .sign(key, hashes.SHA256()))
            _write_private(self.dir / "ca.key", _pem_key(key))
            self.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        names = sorted({*server_names, "localhost", "127.0.0.1"})
        if not self.cert_file.exists() or self._names_of(self.cert_file) != names:
            server_key = ec.generate_private_key(ec.SECP256R1())
            pem = self._sign(server_key.public_key(), "corral-server", names, server=True)
            _write_private(self.key_file, _pem_key(server_key))
            self.cert_file.write_bytes(pem)

    def sign_host(self, csr_pem: str, host: str, address: str) -> bytes:
        """A certificate for ``host`` from the CSR it made (its key stays on the host); the
        name is ours to give, not the CSR's."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise InvalidRequest(f"not a PEM certificate request: {exc}") from exc
        if not csr.is_signature_valid:
            raise InvalidRequest("the certificate request is not signed by its own key")
        return self._sign(csr.public_key(), host, [host, address], server=True, client=True)

    # -- the signing itself ------------------------------------------------------------------
    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, public: object, days: int
                 ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public)  # type: ignore[arg-type]
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days)))

    def _sign(self, public: object, cn: str, sans: list[str], *, server: bool = False,
              client: bool = False) -> bytes:
        ca_cert, ca_key = self._ca()
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        cert = (self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
                              ca_cert.subject, public, VALID_DAYS)
                .add_extension(x509.SubjectAlternativeName(_names(sans)), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    @staticmethod
    def _names_of(path: Path) -> list[str]:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        return sorted([str(n.value) for n in san])
