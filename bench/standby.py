"""Standby refresh: freeze time, refresh time and bytes moved, corral's ``dir`` and ``btrfs``
backends beside the rsync-freeze-rsync recipe of USERS.md §2, on the same tree, in one run.

The tree (default 1.2 GB in ~40,000 files) lives in a btrfs subvolume on a loop device, so all
three methods refresh exactly the same bytes; the rsync targets are plain directories, the btrfs
target a second loop filesystem (two hosts' disks). Each refresh follows 1,000 changed files
while a writer inside the instance (a process under the cgroup freezer) keeps rewriting about
100 files a second. Transfers go over corral's authenticated data channel for corral's methods
and over the same channel for the recipe, so only the method differs.

Needs root (loop devices, mount, cgroup freezer).

    python bench/standby.py                 # 1.2 GB
    python bench/standby.py --size-mb 200   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from corral.disks.btrfs import BtrfsBackend
from corral.disks.channel import DataServer
from corral.disks.dirbackend import DirBackend
from corral.disks.rsync import Endpoint, run_pass
from corral.drivers.base import Handle, Spec
from corral.drivers.cgroups import remove_scope
from corral.drivers.process import ProcessDriver

TOKEN = "bench-" + uuid.uuid4().hex


def loop_btrfs(work: Path, name: str, size_mb: int) -> Path:
    img, mnt = work / f"{name}.img", work / name
    mnt.mkdir()
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(img)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    return mnt


def build_tree(root: Path, total_mb: int, seed: int = 1) -> list[Path]:
    """Many small files and a few large ones, like a Debian root plus some data."""
    rnd = random.Random(seed)
    files: list[Path] = []
    budget = total_mb * 1024 * 1024
    block = os.urandom(1024 * 1024)
    i = 0
    while budget > 0:
        d = root / f"d{i % 300:03d}" / f"s{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        size = min(budget, int(rnd.lognormvariate(9.3, 1.4)) + 1)  # median ~11 KB
        p = d / f"f{i}"
        off = rnd.randrange(len(block))
        p.write_bytes((block[off:] + block)[:size] if size <= len(block) else
                      block * (size // len(block)) + block[: size % len(block)])
        files.append(p)
        budget -= size
        i += 1
    return files


def change(files: list[Path], n: int, rnd: random.Random) -> None:
    for p in rnd.sample(files, n):
        with p.open("r+b") as fh:
            fh.write(os.urandom(512))


WRITER = ("i=0; while :; do i=$((i+1)); d=d$(( i % 300 / 100 ))00; "
          "echo $i > d$(printf %03d $((i % 300)))/s$((i % 7))/w$((i % 50)) 2>/dev/null; "
          "sleep 0.01; done")


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="corral-bench-standby-"))
    mounts: list[Path] = []
    drv = ProcessDriver(scope=f"bench{os.getpid()}")
    handle: Handle | None = None
    server: DataServer | None = None
    try:
        src_fs = loop_btrfs(work, "src", args.size_mb * 3 + 600)
        mounts.append(src_fs)
        dst_fs = loop_btrfs(work, "dst", args.size_mb * 3 + 600)
        mounts.append(dst_fs)
        btrfs = BtrfsBackend(src_fs)
        root = btrfs.create("web")
        t0 = time.monotonic()
        files = build_tree(root, args.size_mb)
        print(f"tree: {len(files):,} files, {args.size_mb} MB, built in "
              f"{time.monotonic() - t0:.1f}s", flush=True)
        targets = work / "targets"
        targets.mkdir()
        (dst_fs / "recv").mkdir()
        token_file = work / "token"
        token_file.write_text(TOKEN)
        server = DataServer(TOKEN, [targets, dst_fs])
        await server.start()
        ep = lambda path: Endpoint("127.0.0.1", server.port, token_file, str(path))  # noqa: E731

        (work / "w").mkdir()
        spec = Spec(name="writer", command=["sh", "-c", WRITER], workdir=str(work / "w"),
                    rootfs=str(root))
        handle = drv.start(drv.create(spec))
        h = handle

        async def freeze() -> None:
            await asyncio.to_thread(drv.freeze, h)

        async def thaw() -> None:
            await asyncio.to_thread(drv.thaw, h)

        # initial copies, not measured as refreshes
        disks = DirBackend(src_fs)  # the same tree: root is src_fs/web
        disks.track("web")
        await run_pass(root, ep(targets / "dir"))
        await run_pass(root, ep(targets / "recipe"))
        base = btrfs.snapshot("web", "0")
        await btrfs.send(base, ep(dst_fs / "recv"))
        rnd = random.Random(2)
        rows = []

        # corral dir
        change(files, args.changes, rnd)
        start = time.monotonic()
        r = await disks.refresh("web", ep(targets / "dir"), freeze, thaw)
        rows.append(("corral dir", r.freeze_s, time.monotonic() - start, r.bytes_sent))
        print(f"  dir frozen pass: {r.frozen.files} files; {disks.last_timing}", flush=True)

        # corral btrfs: freeze only for the snapshot, send after thaw
        change(files, args.changes, rnd)
        start = time.monotonic()
        btrfs.preflush("web")
        await freeze()
        f0 = time.monotonic()
        try:
            snap = btrfs.snapshot("web", "1")
        finally:
            frozen = time.monotonic() - f0
            await thaw()
        sent = await btrfs.send(snap, ep(dst_fs / "recv"), parent=base)
        rows.append(("corral btrfs", frozen, time.monotonic() - start, sent.bytes_sent))

        # the recipe: rsync live, suspend, rsync again (full scan), resume
        change(files, args.changes, rnd)
        start = time.monotonic()
        first = await run_pass(root, ep(targets / "recipe"))
        await freeze()
        f0 = time.monotonic()
        try:
            second = await run_pass(root, ep(targets / "recipe"))
        finally:
            frozen = time.monotonic() - f0
            await thaw()
        rows.append(("rsync-freeze-rsync recipe", frozen, time.monotonic() - start,
                     first.bytes_sent + second.bytes_sent))

        recipe_freeze = rows[-1][1]
        print(f"{'method':28} {'freeze ms':>10} {'refresh s':>10} {'MB moved':>9} "
              f"{'freeze vs recipe':>17}")
        for name, fz, total, moved in rows:
            print(f"{name:28} {fz * 1000:10.1f} {total:10.2f} {moved / 1e6:9.1f} "
                  f"{recipe_freeze / fz:16.1f}x")
    finally:
        if handle is not None:
            drv.stop(handle, 5)
            drv.delete(handle)
        remove_scope(f"bench{os.getpid()}")
        if server is not None:
            await server.stop()
        for m in reversed(mounts):
            subprocess.run(["umount", str(m)], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1200)
    ap.add_argument("--changes", type=int, default=1000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/standby.py needs root (loop devices, mount, cgroup freezer)")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
