"""A tree survives snapshot -> store -> materialise byte- and metadata-identical."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from corral.images.packstore import PackStore
from corral.images.tree import Manifest, materialize, snapshot


def tree_digest(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything that must match, per path (content, type, mode, owner, mtime, link, xattrs)."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames) + ([""] if dirpath == str(root) else []):
            full = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(full).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            link = None
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                link = inodes.setdefault(st.st_ino, rel)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                n: os.getxattr(full, n) for n in os.listxattr(full)
            }
            mtime = None if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns
            # a directory's st_size is the filesystem's business (ext4 never shrinks a
            # directory that once held more entries), not part of the tree
            size = None if stat.S_ISDIR(st.st_mode) else st.st_size
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, mtime, size, content, link,
                        st.st_rdev, tuple(sorted(xattrs.items())))
    return out


@pytest.fixture
def sample_tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "etc" / "deep" / "er").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("box\n")
    (root / "bin").mkdir()
    big = os.urandom(700_000)
    (root / "bin" / "tool").write_bytes(big)
    os.chmod(root / "bin" / "tool", 0o4755)
    (root / "bin" / "tool-copy").write_bytes(big[:300_000] + b"edit" + big[300_000:])
    os.link(root / "bin" / "tool", root / "bin" / "tool-hardlink")
    os.symlink("../etc/hostname", root / "bin" / "link")
    os.symlink("/nonexistent/abs", root / "dangling")
    (root / "empty").write_bytes(b"")
    with open(root / "sparse.img", "wb") as fh:
        fh.seek(50 * 1024**2)
        fh.write(b"middle")
        fh.truncate(100 * 1024**2)
    os.mkfifo(root / "fifo", 0o640)
    os.chmod(root / "etc" / "deep", 0o700)
    with contextlib.suppress(OSError):
        os.setxattr(root / "etc" / "hostname", "user.corral", b"\x00\x01value")
    if os.geteuid() == 0:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.chown(root / "etc" / "hostname", 1234, 5678)
        os.lchown(root / "bin" / "link", 42, 43)
    os.utime(root / "etc", ns=(1_000_000_000, 1_500_000_000_123))
    return root


def test_round_trip_is_identical(tmp_path: Path, sample_tree: Path) -> None:
    with PackStore(tmp_path / "store") as store:
        manifest = snapshot(sample_tree, store)
        raw = manifest.to_json()
        out = tmp_path / "out"
        materialize(Manifest.from_json(raw), store, out)
    assert tree_digest(out) == tree_digest(sample_tree)
    # the sparse file came back sparse: far fewer blocks than its size
    assert os.stat(out / "sparse.img").st_blocks * 512 < 10 * 1024**2
    if shutil.which("rsync"):
        diff = subprocess.run(
            ["rsync", "-naicHX", "--numeric-ids", f"{sample_tree}/", f"{out}/"],
            capture_output=True, text=True, check=True,
        )
        assert diff.stdout.strip() == "", diff.stdout


def test_similar_files_share_chunks(tmp_path: Path, sample_tree: Path) -> None:
    with PackStore(tmp_path / "store") as store:
        manifest = snapshot(sample_tree, store)
        tool = next(e for e in manifest.entries if e.path == "bin/tool")
        copy = next(e for e in manifest.entries if e.path == "bin/tool-copy")
        shared = set(tool.extents[0][1]) & set(copy.extents[0][1])
        assert len(shared) >= len(tool.extents[0][1]) - 2  # only chunks around the edit differ
        before = len(store)
        snapshot(sample_tree, store)  # same tree again: nothing new stored
        assert len(store) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="owners and setuid bits need root to restore")
def test_debian_root_round_trip(tmp_path: Path) -> None:
    """This machine's own Debian files (/etc, /usr/sbin, dpkg's database, setuid tools) survive
    store and restore exactly, as rsync's checksum comparison sees them."""
    root = tmp_path / "debian"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "var" / "lib").mkdir(parents=True)
    for src, dest in (("/etc", root / "etc"), ("/usr/sbin", root / "usr" / "sbin"),
                      ("/var/lib/dpkg", root / "var" / "lib" / "dpkg")):
        subprocess.run(["cp", "-a", src, str(dest)], check=True)
    for tool in ("gpasswd", "newgrp", "chfn", "passwd", "su", "mount"):
        if Path("/usr/bin", tool).exists():
            subprocess.run(["cp", "-a", f"/usr/bin/{tool}", str(root / "usr" / "bin")],
                           check=True)
    os.link(root / "etc" / "hostname", root / "etc" / "hostname.hardlink")
    os.setxattr(root / "etc" / "hostname", "user.origin", b"debian")
    with PackStore(tmp_path / "store") as store:
        manifest = snapshot(root, store)
        out = tmp_path / "restored"
        materialize(Manifest.from_json(manifest.to_json()), store, out)
    diff = subprocess.run(
        ["rsync", "-naicHAX", "--numeric-ids", f"{root}/", f"{out}/"],
        capture_output=True, text=True, check=True,
    )
    assert diff.stdout.strip() == "", diff.stdout[:2000]
    assert tree_digest(out) == tree_digest(root)
