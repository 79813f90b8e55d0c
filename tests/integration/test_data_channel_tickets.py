"""The data channel lets in only what a server's ticket allows, and over TLS only the host the
ticket names (real rsync, real sockets and real host certificates on loopback).

A host holding a valid ticket for one instance's slot can write there and nowhere else: not
into another instance's slot, not into the live disks, not outside the disk root, not through
a symlink, not by an rsync option that names a path. Each refusal leaves nothing written.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

import pytest
from channelkit import authority, digest, host_tls, receiver, rsync
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from corral.agent.disks import HostDisks
from corral.control.pki import Authority
from corral.disks import rsh
from corral.disks.channel import NOT_JOINED, ChannelTls, server_context
from corral.disks.frames import DATA, ERR, EXIT, client_context, frame

pytestmark = pytest.mark.skipif(not Path("/usr/bin/rsync").exists(), reason="rsync not installed")
MB = 1024 * 1024


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(10):
        (src / "d" / f"f{i}").write_bytes(os.urandom(2000 + i))
    return src


def empty(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


# -- tickets ----------------------------------------------------------------------------------
async def test_a_valid_ticket_lands_and_a_bad_one_is_refused(tmp_path: Path,
                                                              tree: Path) -> None:
    async with receiver(tmp_path) as rx:
        dest = rx.slot()
        refusals = [
            ("no transfer ticket", None),
            ("no transfer ticket", ""),
            ("not one the server signed", rx.ticket(key=Ed25519PrivateKey.generate())),
            ("not one the server signed", "not-a-ticket"),
            ("has expired", rx.ticket(ttl=-1)),
            ("is for host h9, not h2", rx.ticket(target="h9")),
        ]
        for said, ticket in refusals:
            code, err = await rsync(tree, dest, rx.port, ticket)
            assert code != 0 and said in err, (said, err)
            assert empty(dest), said
        code, err = await rsync(tree, dest, rx.port, rx.ticket())
        assert code == 0, err
        assert digest(dest) == digest(tree)


async def test_a_host_that_has_not_joined_checks_nothing(tmp_path: Path, tree: Path) -> None:
    async with receiver(tmp_path) as rx:
        ticket = rx.ticket()
        rx.disks.ticket_key = ""
        code, err = await rsync(tree, rx.slot(), rx.port, ticket)
        assert code != 0 and NOT_JOINED in err
        assert empty(rx.slot())


async def test_a_ticket_writes_only_into_its_own_slot(tmp_path: Path, tree: Path) -> None:
    async with receiver(tmp_path) as rx:
        ticket = rx.ticket("a", "standby")
        other = rx.slot("b", "standby")
        (other / "keep").write_text("b's copy")
        live = rx.disks.publish("a", rx.disks.new_dir("a"))
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        for dest in (other, rx.slot("a", "incoming"), live, rx.disks.root,
                     rx.disks.root / ".tmp" / "a.standby", elsewhere, tmp_path / "new"):
            code, err = await rsync(tree, dest, rx.port, ticket)
            assert code != 0 and "outside the slot" in err, (dest, err)
        assert [p.name for p in other.iterdir()] == ["keep"]
        assert empty(rx.slot("a", "incoming")) and empty(live) and empty(elsewhere)
        assert not (tmp_path / "new").exists()
        assert not (rx.disks.root / "d").exists()
        # through a symlink inside the slot (a pass can bring one), or as the slot itself
        mine = rx.slot("a", "standby")
        (mine / "link").symlink_to(elsewhere)
        code, err = await rsync(tree, mine / "link", rx.port, ticket)
        assert code != 0 and "outside the slot" in err
        (mine / "link").unlink()
        mine.rmdir()
        mine.symlink_to(elsewhere)
        code, err = await rsync(tree, mine, rx.port, ticket)
        assert code != 0 and "outside the slot" in err
        assert empty(elsewhere)
        mine.unlink()
        code, err = await rsync(tree, rx.slot("a", "standby"), rx.port, ticket)
        assert code == 0, err


async def test_an_rsync_option_cannot_name_a_path_elsewhere(tmp_path: Path,
                                                            tree: Path) -> None:
    async with receiver(tmp_path) as rx:
        dest, ticket = rx.slot(), rx.ticket()
        temp = rx.disks.root / ".tmp" / "web.standby"
        outside = tmp_path / "outside"
        outside.mkdir()
        for extra in ([f"--temp-dir={outside}"], [f"--partial-dir={outside}", "--partial"],
                      ["--temp-dir=rel"], ["-b", f"--backup-dir={outside}"],
                      ["-b", "--backup-dir=.."], [f"--link-dest={outside}"], ["-K"],
                      [f"--temp-dir={rx.disks.root / '.tmp' / 'other.standby'}"]):
            code, err = await rsync(tree, dest, rx.port, ticket, extra=extra)
            assert code != 0, extra
            assert "not allowed" in err or "outside the ticket's slot" in err, (extra, err)
            assert empty(dest) and empty(outside), extra
        # the ticket's own temp dir is where the agent's passes keep their temp files
        code, err = await rsync(tree, dest, rx.port, ticket, extra=[f"--temp-dir={temp}"])
        assert code == 0, err
        assert digest(dest) == digest(tree)


# -- mutual TLS -------------------------------------------------------------------------------
@pytest.fixture
def fleet_ca(tmp_path: Path) -> Authority:
    return authority(tmp_path / "pki")


async def test_over_tls_only_the_ticket_s_source_gets_in(tmp_path: Path, tree: Path,
                                                         fleet_ca: Authority) -> None:
    certs = tmp_path / "certs"
    h1 = host_tls(fleet_ca, certs, "h1")
    h3 = host_tls(fleet_ca, certs, "h3")
    stranger = host_tls(authority(tmp_path / "other-pki"), tmp_path / "other", "h1")
    async with receiver(tmp_path, tls=host_tls(fleet_ca, certs, "h2")) as rx:
        dest, ticket = rx.slot(), rx.ticket(source="h1")
        attempts = {
            "no certificate": ChannelTls("", "", fleet_ca.ca_file.as_posix()),
            "another CA's certificate": ChannelTls(stranger.cert_file, stranger.key_file,
                                                   h1.ca_file),
            "h3's certificate": h3,
            "in clear": None,
        }
        for what, tls in attempts.items():
            code, err = await rsync(tree, dest, rx.port, ticket, tls=tls)
            assert code != 0, what
            assert empty(dest), what
            if what == "h3's certificate":
                assert "the peer's certificate names h3" in err
        code, err = await rsync(tree, dest, rx.port, ticket, tls=h1)
        assert code == 0, err
        assert digest(dest) == digest(tree)


async def test_the_sender_refuses_a_receiver_that_is_not_the_host_named(
        tmp_path: Path, tree: Path, fleet_ca: Authority) -> None:
    certs = tmp_path / "certs"
    h1 = host_tls(fleet_ca, certs, "h1")
    async with receiver(tmp_path, host="h2", tls=host_tls(fleet_ca, certs, "h3")) as rx:
        code, err = await rsync(tree, rx.slot(), rx.port, rx.ticket(), tls=h1, peer="h2")
        assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in err, err
        assert empty(rx.slot())


async def test_a_big_transfer_over_tls_arrives_byte_identical(tmp_path: Path,
                                                             fleet_ca: Authority) -> None:
    """The sending agent's own pass (HostDisks.send) through TLS records: a frame left
    decrypted in the SSL buffer after ``select`` said nothing was there would stall it."""
    h1 = host_tls(fleet_ca, tmp_path / "certs", "h1")
    sender = HostDisks(tmp_path / "h1" / "disks", "dir", tmp_path / "h1", "h1")
    sender.use_tls(h1.cert_file, h1.key_file, h1.ca_file)
    disk = sender.publish("web", sender.new_dir("web"))
    (disk / "sub").mkdir()
    for i in range(20):  # 50 MB, in sizes that end mid-record
        (disk / ("sub" if i % 2 else ".") / f"f{i}").write_bytes(os.urandom(5 * MB // 2 + i))
    try:
        async with receiver(tmp_path, tls=host_tls(fleet_ca, tmp_path / "certs", "h2")) as rx:
            target = rx.target()
            res = await sender.send("web", target, "live", "", None, None,
                                    ticket=rx.ticket(source="h1"))
            assert res.bytes_sent > 50 * MB
            assert digest(Path(str(target["path"]))) == digest(disk)
    finally:
        await sender.stop()


def test_the_relay_reads_what_tls_already_decrypted(tmp_path: Path,
                                                    fleet_ca: Authority) -> None:
    """The answer line and the first frames can share one TLS record: the line is read byte by
    byte, the rest waits decrypted in the SSL object, where ``select`` does not see it."""
    h1, h2 = (host_tls(fleet_ca, tmp_path / "certs", h) for h in ("h1", "h2"))
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with server_context(h2).wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)  # the hello
            tls.sendall(b'{"ok": true}\n' + frame(DATA, b"payload") + frame(ERR, b"")
                        + frame(EXIT, struct.pack(">i", 7)))  # one record
            done.wait(10)  # and nothing more on the wire until the client is done

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    raw = socket.create_connection(listener.getsockname())
    sock = client_context(h1.ca_file, h1.cert_file, h1.key_file).wrap_socket(
        raw, server_hostname="h2")
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    result: list[int] = []
    try:
        sock.sendall(b'{"argv": [], "ticket": ""}\n')
        assert rsh._line(sock) == b'{"ok": true}'
        worker = threading.Thread(target=lambda: result.append(rsh.relay(sock, stdin_r, out_w)),
                                  daemon=True)
        worker.start()
        worker.join(5)
        assert result == [7], "the relay waited on select for bytes it already had"
        assert os.read(out_r, 100) == b"payload"
    finally:
        done.set()
        sock.close()
        server.join(5)
        listener.close()
        for fd in (stdin_r, stdin_w, out_r, out_w):
            os.close(fd)
