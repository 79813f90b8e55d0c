"""A tiny root filesystem made from Debian's static busybox, for demos and tests.

Containers need *some* root filesystem, and the fleet must be demonstrable without any network:
``busybox-static`` ships one statically linked binary that is a whole userland, so a root made
of that binary plus a symlink per applet is complete, about 2 MB, and built in milliseconds.
Per-instance copies hard-link the binary, so a hundred instances cost a hundred small trees.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

from corral.errors import ConfigError

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
#: written last, so a directory holding it is complete (a crashed build is rebuilt).
MARKER = ".corral-rootfs"
_HINT = "install Debian's static busybox: apt-get install busybox-static"
_PT_INTERP = 3

_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
_GROUP = "root:x:0:\nnogroup:x:65534:\n"
_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost\n"


def find_static_busybox() -> Path:
    """The static busybox binary, or a :class:`ConfigError` saying how to get it.

    A dynamically linked busybox (Debian's plain ``busybox`` package) would not run inside a root
    that has no libc, so it is refused here rather than failing later inside a container.
    """
    found = [Path(p) for p in BUSYBOX_CANDIDATES if Path(p).is_file()]
    which = shutil.which("busybox")
    if which:
        found.append(Path(which))
    for path in found:
        if not _is_dynamic_elf(path):
            return path
    if found:
        raise ConfigError(f"{found[0]} is dynamically linked; a root filesystem needs a static one",
                          hint=_HINT)
    raise ConfigError("busybox is not installed", hint=_HINT)


def _is_dynamic_elf(path: Path) -> bool:
    """True when the ELF file asks for a program interpreter (i.e. is dynamically linked)."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            return True  # not an ELF binary we understand: do not trust it in a bare root
        is64 = head[4] == 2
        endian = "<" if head[5] == 1 else ">"
        if is64:
            phoff, = struct.unpack_from(endian + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 54)
        else:
            phoff, = struct.unpack_from(endian + "I", head, 28)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 42)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            ptype, = struct.unpack(endian + "I", f.read(4))
            if ptype == _PT_INTERP:
                return True
    return False


def _applets(busybox: Path) -> list[str]:
    """Applet paths relative to the root (``usr/bin/awk``); plain ``--list`` goes to ``bin/``."""
    try:
        out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        return [line.strip().lstrip("/") for line in out.splitlines() if line.strip()]
    except subprocess.CalledProcessError:
        out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        return [f"bin/{line.strip()}" for line in out.splitlines() if line.strip()]


def _marker_text(busybox: Path) -> str:
    st = busybox.stat()
    return f"busybox {busybox} {st.st_size} {int(st.st_mtime)}\n"


def _is_complete(root: Path, marker: str | None = None) -> bool:
    path = root / MARKER
    if not path.is_file():
        return False
    return marker is None or path.read_text() == marker


def _populate(root: Path, busybox: Path) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "etc", "root",
              "run", "var/log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for d in ("tmp", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / d, 0o1777)
    shutil.copy2(busybox, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    for rel in _applets(busybox):
        if rel in ("bin/busybox", "") or rel.startswith(".."):
            continue
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(root / "bin" / "busybox", link.parent)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    (root / "etc" / "passwd").write_text(_PASSWD)
    (root / "etc" / "group").write_text(_GROUP)
    (root / "etc" / "hostname").write_text("corral\n")
    (root / "etc" / "hosts").write_text(_HOSTS)


def build_busybox_rootfs(dest: Path) -> Path:
    """Build (once) a busybox root filesystem at ``dest`` and return ``dest``.

    Idempotent and safe to race: the tree is built beside ``dest`` and renamed into place, and a
    complete tree is recognised by its marker (which also records which busybox built it, so an
    upgraded busybox rebuilds the template).
    """
    dest = Path(dest).absolute()
    busybox = find_static_busybox()
    marker = _marker_text(busybox)
    if _is_complete(dest, marker):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.build-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _populate(tmp, busybox)
        (tmp / MARKER).write_text(marker)
        if dest.exists():
            if _is_complete(dest, marker):  # someone else finished first
                return dest
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(dest)
        except OSError:
            if not _is_complete(dest, marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def clone_rootfs(template: Path, dest: Path) -> Path:
    """A per-instance copy of ``template`` at ``dest``; cheap: the busybox binary is hard-linked.

    Returns ``dest``. A complete copy already at ``dest`` is kept as it is (the instance's own
    changes survive a repeated create); a partial one is replaced.
    """
    template, dest = Path(template).absolute(), Path(dest).absolute()
    if not _is_complete(template):
        raise ConfigError(f"{template} is not a corral root filesystem template",
                          hint="build one with corral.agent.busybox.build_busybox_rootfs")
    if _is_complete(dest):
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    copy_template(template, dest)
    shutil.copy2(template / MARKER, dest / MARKER)
    return dest


def copy_template(template: Path, dest: Path) -> Path:
    """Copy a template into ``dest`` (new, or an empty directory or subvolume that must stay
    what it is); the busybox binary is hard-linked when both are on one filesystem."""
    binary = (template / "bin" / "busybox").resolve()

    def copy(src: str, dst: str) -> object:
        if Path(src).resolve() == binary:
            try:
                os.link(src, dst)
                return dst
            except OSError:  # another filesystem: fall back to a copy
                pass
        return shutil.copy2(src, dst)

    shutil.copytree(template, dest, symlinks=True, copy_function=copy, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(MARKER))
    for d in ("tmp", "var/tmp"):
        if (dest / d).is_dir():
            os.chmod(dest / d, 0o1777)
    return dest
