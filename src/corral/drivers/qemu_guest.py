"""The small guest the qemu driver's tests and the tour boot: built from Debian packages, cached.

A VM image for corral is a directory holding ``disk.raw`` (or ``disk.qcow2``) and, for a guest
booted straight from a kernel, ``vmlinux`` (or ``vmlinuz``) and ``initrd.img`` beside it (see
:mod:`corral.drivers.qemu`). This module makes one such directory without any download but two
Debian packages, so the project never depends on a prebuilt image from elsewhere:

- the kernel is Debian's own (``linux-image-amd64``, fetched with ``apt-get download`` and
  unpacked with ``dpkg-deb``, never installed); its modules for virtio, ext2/ext4, the ACPI power
  button and fw_cfg go into the initramfs, since Debian builds all of them as modules;
- the initramfs is busybox-static plus a shell ``/init``: no distribution to boot, so the guest
  is up in a few seconds even emulated (TCG) on two cores;
- the disk is a raw ext2 file (``mke2fs`` on the host; a blank disk is formatted in the guest on
  first boot instead), the one place the guest keeps anything, so it is what moves with the VM.

What the guest runs is the instance's command (the driver hands it over through fw_cfg as a
small shell script). ``corral-guest-service`` is the workload built in for tests and the tour: an
HTTP server on port 80, a counting stream on port 7000 (a connection held open through a live
migration must go on without a gap), and a writer of numbered, checksummed records to the disk,
which live migration checks for gaps and for a boot id that did not change. With a virtual IP
the guest takes the address its host routes to it (``opt/corral/net`` in fw_cfg).

``python -m corral.drivers.qemu_guest [--cache DIR]`` builds (or finds) the guest and prints its
directory; ``scripts/bootstrap`` runs it as root, tests call :func:`build_guest` lazily.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from corral.errors import ConfigError

#: bump when anything below changes what is built, so a cached guest is rebuilt
GUEST_VERSION = "5"
KERNEL_META = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
DISK_MIB = 32
#: what the initramfs loads, in this order after their dependencies
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4", "button", "evdev",
           "qemu_fw_cfg")
#: the port the guest's HTTP service listens on, and what ``vm.json`` forwards to it by default
SERVICE_PORT = 80
#: the port of the counting stream (corral-count), for a connection held across a migration
COUNT_PORT = 7000
DEFAULT_HOST_PORT = 8080
#: kernel arguments ``vm.json`` adds to the driver's ``console=ttyS0 panic=-1``: two serial
#: ports (console, exit status), no probing for a PS/2 mouse, no TSC calibration (slow in TCG)
KERNEL_ARGS = "8250.nr_uarts=2 i8042.noaux tsc=reliable no_timer_check"

INIT = r"""#!/bin/sh
# corral guest init (PID 1): modules, network, the disk at /data, the instance's command.
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root
mkdir -p /proc /sys /dev /tmp /run /data /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "corral-guest: $*"; }
while read -r m; do insmod "/lib/modules/$m.ko" || say "cannot load module $m"; done \
  < /lib/modules/order
hostname corral-guest
ip link set lo up
net=/sys/firmware/qemu_fw_cfg/by_name/opt/corral/net/raw
if ! ip link set eth0 up 2>/dev/null; then
  say "no network device"
elif [ -r "$net" ]; then  # a virtual IP the host routes to this VM's tap (drivers/qemu_net.py)
  vip=$(cat "$net")
  ip addr add "$vip/32" dev eth0 && ip route add 169.254.0.1 dev eth0 &&
    ip route add default via 169.254.0.1 && say "address $vip"
else  # QEMU's user-mode network: fixed addresses
  ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
  echo "nameserver 10.0.2.3" > /etc/resolv.conf
fi
if [ -b /dev/vda ]; then
  if cmp -s -n 65536 /dev/vda /dev/zero; then
    say "blank disk: making an ext2 filesystem"
    mke2fs -F -L corral-data /dev/vda >/dev/null
  fi
  mount /dev/vda /data || say "cannot mount /dev/vda"
fi
# the ACPI power button (QMP system_powerdown) ends every process, as a shutdown does
for ev in /sys/class/input/event*; do
  [ "$(cat "$ev/device/name" 2>/dev/null)" = "Power Button" ] || continue
  (
    trap '' TERM
    while dd if="/dev/input/${ev##*/}" of=/dev/null bs=24 count=1 2>/dev/null; do
      say "power button: ending every process"
      kill -TERM -1
    done
  ) &
done
run=/sys/firmware/qemu_fw_cfg/by_name/opt/corral/run/raw
if [ -r "$run" ]; then cat "$run" > /run/corral-run.sh; else
  echo 'exec corral-guest-service' > /run/corral-run.sh; fi
cd /data 2>/dev/null || cd /
say "running $(cat /proc/sys/kernel/random/boot_id)"
sh /run/corral-run.sh </dev/null &
wait $!
rc=$?
if [ "$rc" -gt 128 ]; then status="signal $((rc - 128))"; else status="exit $rc"; fi
say "workload ended: $status"
echo "$status" > /dev/ttyS1
cd /
sync
umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null
poweroff -f
"""

COUNT = r"""#!/bin/sh
# corral-count: 1, 2, 3, ... a line every 0.1 s to whoever connected, counted in this shell's
# memory: a connection that survives a live migration goes on without a gap or a repeat
i=0
while :; do
  i=$((i + 1))
  echo "$i" || exit 0
  sleep 0.1
done
"""

SERVICE = r"""#!/bin/sh
# corral-guest-service: HTTP on port 80, a counting stream on port 7000 (one per connection,
# see corral-count), and numbered, checksummed records on the disk.
# A record is "SEQ UNIXTIME BOOTID SUM" with SUM the first 16 hex digits of the sha256 of
# "SEQ UNIXTIME BOOTID"; each one is fsynced before the next is written.
records=/data/records.log
interval=${RECORD_INTERVAL:-1}
boot=$(cat /proc/sys/kernel/random/boot_id)
sum() { printf '%s' "$1" | sha256sum | cut -c1-16; }
n=0
if [ -s "$records" ]; then
  last=$(tail -n 1 "$records")
  if [ "$(sum "${last% *}")" = "${last##* }" ]; then n=${last%% *}; else
    echo "corral-guest-service: last record torn ($last): dropped"
    sed -i '$d' "$records"
    n=$(tail -n 1 "$records" | cut -d' ' -f1)
  fi
fi
n=${n:-0}
mkdir -p /www
ln -sf "$records" /www/records.log
printf 'corral guest %s\n' "$boot" > /www/index.html
httpd -f -p __PORT__ -h /www &
web=$!
nc -ll -p __COUNT_PORT__ -e /bin/corral-count &
count=$!
(
  while :; do
    n=$((n + 1))
    rec="$n $(date +%s) $boot"
    echo "$rec $(sum "$rec")" >> "$records"
    sync "$records"
    sleep "$interval"
  done
) &
writer=$!
trap 'kill $web $count $writer 2>/dev/null; sync; exit 0' TERM INT
echo "corral-guest-service: http on port __PORT__, counts on __COUNT_PORT__, records from \
$((n + 1)) (boot $boot)"
wait
""".replace("__PORT__", str(SERVICE_PORT)).replace("__COUNT_PORT__", str(COUNT_PORT))


def default_cache() -> Path:
    env = os.environ.get("CORRAL_GUEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "corral" / "qemu-guest"


def _run(argv: list[str], cwd: Path | None = None, hint: str = "") -> str:
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise ConfigError(f"{argv[0]} not found", hint=hint or "apt-get install it") from e
    if r.returncode != 0:
        raise ConfigError(f"{' '.join(argv[:3])} failed: {r.stderr.strip()[-400:]}",
                          hint=hint or "see the message above")
    return r.stdout


def _download(package: str, into: Path) -> Path:
    """``apt-get download`` as root writes as root (the _apt sandbox cannot reach a temp dir)."""
    _run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", package], cwd=into,
         hint="run 'apt-get update' first (the package lists may be missing or old)")
    found = sorted(into.glob(f"{package}_*.deb"))
    if not found:
        raise ConfigError(f"apt-get download {package} left no .deb in {into}")
    return found[-1]


def kernel_package(tmp: Path) -> Path:
    """The .deb of the kernel ``linux-image-amd64`` depends on now."""
    meta = _download(KERNEL_META, tmp)
    depends = _run(["dpkg-deb", "-f", str(meta), "Depends"])
    names = re.findall(r"(linux-image-[0-9][^\s,|()]*)", depends)
    if not names:
        raise ConfigError(f"{KERNEL_META} depends on no kernel image: {depends!r}")
    return _download(names[0], tmp)


def extract_vmlinux(bzimage: Path, dest: Path) -> bool:
    """Unpack the ELF kernel from Debian's bzImage (an xz stream inside it), written sparse.

    QEMU boots that ELF directly through its PVH entry point (Debian sets CONFIG_PVH), which
    skips the firmware's loading and the kernel's own xz decompression: under TCG that is the
    difference between about 14 s and 3 s to the guest's first process. Returns False when the
    kernel is compressed otherwise; the bzImage then boots as it is, only slower."""
    data = bzimage.read_bytes()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        return False
    try:
        elf = lzma.LZMADecompressor().decompress(data[at:])
    except lzma.LZMAError:
        return False
    if elf[:4] != b"\x7fELF":
        return False
    block = 1 << 16
    with open(dest, "wb") as f:
        for i in range(0, len(elf), block):
            chunk = elf[i:i + block]
            if chunk.count(0) == len(chunk):
                f.seek(len(chunk), os.SEEK_CUR)
            else:
                f.write(chunk)
        f.truncate(len(elf))
    return True


def module_depends(ko: Path) -> list[str]:
    """The ``depends=`` of a module's .modinfo (module names use '_' there, files may use '-')."""
    m = re.search(rb"depends=([^\0]*)\0", ko.read_bytes())
    return [d for d in (m.group(1).decode().split(",") if m else []) if d]


def module_order(root: Path, wanted: Iterable[str]) -> list[Path]:
    """The .ko files for ``wanted`` and what they depend on, dependencies first."""
    files: dict[str, Path] = {}
    for ko in (root / "lib" / "modules").glob("*/kernel/**/*.ko"):
        files.setdefault(ko.stem.replace("-", "_"), ko)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        ko = files.get(key)
        if ko is None:
            raise ConfigError(f"kernel module {name} is not in the kernel package",
                              hint="a built-in driver needs no module: drop it from MODULES")
        for dep in module_depends(ko):
            visit(dep)
        order.append(ko)

    for name in wanted:
        visit(name)
    return order


def require_static(binary: Path) -> None:
    """The initramfs has no libc: the busybox put in it must be the static one (an ELF with
    no PT_INTERP program header)."""
    data = binary.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ConfigError(f"{binary} is not a 64-bit little-endian ELF",
                          hint="apt-get install busybox-static")
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        at = phoff + i * phentsize
        if int.from_bytes(data[at:at + 4], "little") == 3:  # PT_INTERP
            raise ConfigError(f"{binary} is linked dynamically",
                              hint="apt-get install busybox-static")


class Cpio:
    """An initramfs archive (newc), written in memory: files, directories, symlinks, nodes."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
               ) -> None:
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(name.encode() + b"\0")
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initramfs(modules: list[Path], busybox: Path = BUSYBOX) -> bytes:
    require_static(busybox)
    a = Cpio()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "run", "data",
              "root", "www"):
        a.dir(d)
    a.chardev("dev/console", 5, 1)
    a.chardev("dev/null", 1, 3)
    a.file("bin/busybox", busybox.read_bytes(), 0o755)
    a.symlink("bin/sh", "busybox")
    a.file("init", INIT.encode(), 0o755)
    a.file("bin/corral-guest-service", SERVICE.encode(), 0o755)
    a.file("bin/corral-count", COUNT.encode(), 0o755)
    a.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    a.file("etc/group", b"root:x:0:\n")
    for ko in modules:
        a.file(f"lib/modules/{ko.stem}.ko", ko.read_bytes())
    a.file("lib/modules/order", "".join(f"{ko.stem}\n" for ko in modules).encode())
    return gzip.compress(a.finish(), compresslevel=6, mtime=0)


def make_disk(path: Path, mib: int = DISK_MIB) -> None:
    """A sparse raw file with an empty ext2 filesystem (the guest mounts it at /data)."""
    with open(path, "wb") as f:
        f.truncate(mib * 1024 * 1024)
    _run(["mke2fs", "-q", "-F", "-t", "ext2", "-L", "corral-data", str(path)],
         hint="apt-get install e2fsprogs")


def _local_key() -> str:
    """What of the guest is made here (scripts, modules chosen, busybox), so a cached guest
    made by older code is never taken for a current one."""
    h = hashlib.sha256()
    h.update(GUEST_VERSION.encode())
    h.update("\0".join((INIT, SERVICE, KERNEL_ARGS, *MODULES)).encode())
    h.update(hashlib.sha256(BUSYBOX.read_bytes()).digest())
    return h.hexdigest()[:12]


def cached(cache: Path | None = None) -> Path | None:
    """The newest complete guest in the cache made by this code, if any (no package lookup)."""
    root = cache or default_cache()
    found = sorted((d for d in root.glob(f"guest-{_local_key()}-*") if (d / "vm.json").is_file()),
                   key=lambda d: d.stat().st_mtime)
    return found[-1] if found else None


def build_guest(cache: Path | None = None, *, refresh: bool = False) -> Path:
    """The guest's directory (``vmlinux``, ``initrd.img``, ``disk.raw``, ``vm.json``), built
    once per kernel version and kept; complete whenever it exists (built aside, renamed)."""
    root = cache or default_cache()
    if not refresh:
        have = cached(root)
        if have is not None:
            return have
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=root) as tmp_s:
        tmp = Path(tmp_s)
        deb = kernel_package(tmp)
        kernel = hashlib.sha256(deb.name.encode()).hexdigest()[:8]
        dest = root / f"guest-{_local_key()}-{kernel}"
        if (dest / "vm.json").is_file():
            os.utime(dest)
            return dest
        unpacked = tmp / "kernel"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        vmlinuz = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise ConfigError(f"{deb.name} holds no /boot/vmlinuz-*")
        out = tmp / "guest"
        out.mkdir()
        if not extract_vmlinux(vmlinuz[-1], out / "vmlinux"):
            shutil.copyfile(vmlinuz[-1], out / "vmlinuz")
        modules = module_order(unpacked, MODULES)
        (out / "initrd.img").write_bytes(build_initramfs(modules))
        make_disk(out / "disk.raw")
        (out / "vm.json").write_text(json.dumps({
            "kernel": deb.name.split("_")[0] + " " + deb.name.split("_")[1],
            "forward": [f"tcp::{DEFAULT_HOST_PORT}-:{SERVICE_PORT}"],
            "append": KERNEL_ARGS,
        }, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    return dest


class CountStream:
    """A client of the guest's counting stream (``corral-count`` on :data:`COUNT_PORT`),
    read by a thread as long as the connection lasts, each number with its arrival time: what
    the live-migration test and bench hold open through a move. ``sock`` is connected (the
    caller waits for the guest to answer its own way)."""

    def __init__(self, sock: socket.socket, read_timeout: float) -> None:
        self.sock = sock
        self.sock.settimeout(read_timeout)  # far above any pause a migration makes
        self.numbers: list[int] = []
        self.times: list[float] = []
        #: why reading stopped (None: it goes on)
        self.error: str | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    @staticmethod
    def connect(address: str, timeout: float = 2.0) -> socket.socket | None:
        """A connection to the stream, or None while nothing answers there."""
        try:
            return socket.create_connection((address, COUNT_PORT), timeout=timeout)
        except OSError:
            return None

    def _read(self) -> None:
        buf = b""
        try:
            while chunk := self.sock.recv(4096):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                got = [int(x) for x in lines if x.strip()]
                self.numbers += got
                self.times += [time.monotonic()] * len(got)
            self.error = "the guest closed the connection"
        except (OSError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def broken(self) -> str | None:
        """Why the stream is not one unbroken count (it stopped, skipped or repeated)."""
        if self.error is not None:
            return f"the held connection broke: {self.error}"
        nums = list(self.numbers)
        if not nums or nums != list(range(nums[0], nums[0] + len(nums))):
            return f"the stream skipped or repeated: {nums[:5]} ... {nums[-5:]}"
        return None

    def longest_pause(self, since: int = 0) -> float:
        """The longest wait between two numbers from the ``since``-th on (s)."""
        ts = self.times[max(0, since - 1):]
        return max((b - a for a, b in itertools.pairwise(ts)), default=0.0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(10)


def clone_guest(guest: Path, dest: Path) -> Path:
    """A VM disk directory at ``dest`` from a built guest: its own copy of the disk (sparse),
    the kernel and initramfs hard-linked (QEMU only reads them). Returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(guest.iterdir()):
        target = dest / src.name
        if src.name.startswith("disk."):
            _run(["cp", "--sparse=always", str(src), str(target)])
            continue
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m corral.drivers.qemu_guest",
                                description="build (or find) the qemu driver's test guest")
    p.add_argument("--cache", type=Path, default=None, help=f"default: {default_cache()}")
    p.add_argument("--refresh", action="store_true", help="look for a newer kernel package")
    args = p.parse_args(argv)
    try:
        print(build_guest(args.cache, refresh=args.refresh))
    except ConfigError as e:
        print(f"error: {e.message}\nhint: {e.hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
