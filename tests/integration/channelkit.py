"""A throwaway fleet for data channel tests: the server's ticket key, a CA with real host
certificates, a receiving agent's disks, and rsync run over corral's remote shell as a sending
agent runs it.

Host certificates are made the way an enrolling agent gets its own (agent/identity.py: a key and
a CSR on the host, signed by ``Authority.sign_host``, which names the host and its address).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from corral.agent.disks import HostDisks
from corral.control.pki import Authority
from corral.disks import tickets
from corral.disks.channel import ChannelTls
from corral.disks.rsync import Endpoint, channel_env, rsh


def authority(where: Path) -> Authority:
    ca = Authority(where)
    ca.ensure(["localhost"])
    return ca


def host_tls(ca: Authority, where: Path, host: str, address: str = "127.0.0.1") -> ChannelTls:
    """``host``'s certificate and key from ``ca``, and that CA's certificate."""
    where.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
           .sign(key, hashes.SHA256()))
    pem = ca.sign_host(csr.public_bytes(serialization.Encoding.PEM).decode(), host, address)
    key_file, cert_file = where / f"{host}.key", where / f"{host}.crt"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    cert_file.write_bytes(pem)
    return ChannelTls(str(cert_file), str(key_file), str(ca.ca_file))


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Receiver:
    """A receiving agent's disks (host ``disks.host``) trusting the tickets of ``key``."""

    disks: HostDisks
    key: Ed25519PrivateKey

    @property
    def port(self) -> int:
        return self.disks.port

    def ticket(self, name: str = "web", slot: str = "standby", source: str = "h1",
               target: str | None = None, key: Ed25519PrivateKey | None = None,
               ttl: float = tickets.TTL) -> str:
        return tickets.issue(key or self.key, name, slot, source=source,
                             target=target or self.disks.host, ttl=ttl)

    def slot(self, name: str = "web", slot: str = "standby") -> Path:
        return Path(self.disks.recv_prepare(name, slot)["path"])

    def target(self, name: str = "web", slot: str = "standby") -> dict[str, object]:
        """What the server hands the sender: ``disk_recv``'s answer plus host and slot."""
        return {**self.disks.recv_prepare(name, slot), "address": "127.0.0.1",
                "port": self.port, "host": self.disks.host, "slot": slot}


@asynccontextmanager
async def receiver(tmp: Path, host: str = "h2", tls: ChannelTls | None = None,
                   key: Ed25519PrivateKey | None = None) -> AsyncIterator[Receiver]:
    key = key or Ed25519PrivateKey.generate()
    disks = HostDisks(tmp / host / "disks", "dir", tmp / host, host)
    disks.ticket_key = tickets.public_hex(key)
    if tls is not None:
        disks.use_tls(tls.cert_file, tls.key_file, tls.ca_file)
    await disks.start()
    try:
        yield Receiver(disks, key)
    finally:
        await disks.stop()


async def rsync(src: Path, dest: Path | str, port: int, ticket: str | None, *,
                tls: ChannelTls | None = None, peer: str = "h2",
                extra: Sequence[str] = ()) -> tuple[int, str]:
    """rsync ``src`` into ``dest`` on the receiver over the data channel; (exit code, stderr).
    ``ticket`` None: none in the environment at all."""
    ep = Endpoint("127.0.0.1", port, str(dest), ticket or "", peer, tls)
    env = channel_env(ep)
    if ticket is None:
        del env["CORRAL_TICKET"]
    proc = await asyncio.create_subprocess_exec(
        "rsync", "-a", "--delete", *extra, "-e", rsh(ep), f"{src}/", f"127.0.0.1:{dest}/",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env)
    _, err = await proc.communicate()
    return proc.returncode or 0, err.decode(errors="replace")
