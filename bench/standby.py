"""Standby refresh: freeze time, refresh time and bytes moved, corral's ``dir`` and ``btrfs``
backends beside the rsync-freeze-rsync recipe of USERS.md §2, on the same tree, in one run.

The tree (default 1.2 GB in ~40,000 files) lives in a btrfs subvolume on a loop device, so all
three methods refresh exactly the same bytes; the rsync targets are plain directories, the btrfs
target a second loop filesystem (two hosts' disks). Each refresh follows 1,000 changed files
while a writer inside the instance (a process under the cgroup freezer) keeps rewriting about
100 files a second. Transfers go over corral's data channel (in clear, with transfer tickets from
a throwaway server key) for corral's methods and over the same channel for the recipe, so only
the method differs.

corral's figures come from the agent's own disk code (``agent.disks.HostDisks``: a live pass,
then the frozen pass, exactly what a ``standby-sync`` runs). Needs root (loop devices, mount,
cgroup freezer).

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
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from corral.agent.disks import HostDisks
from corral.disks import tickets
from corral.disks.rsync import Endpoint, run_pass
from corral.drivers.base import Handle, Spec
from corral.drivers.cgroups import remove_scope
from corral.drivers.process import ProcessDriver

#: the server's ticket key: every pass carries a ticket it signed
KEY = Ed25519PrivateKey.generate()


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
    hosts: list[HostDisks] = []
    try:
        src_fs = loop_btrfs(work, "src", args.size_mb * 3 + 600)
        mounts.append(src_fs)
        dst_fs = loop_btrfs(work, "dst", args.size_mb * 3 + 600)
        mounts.append(dst_fs)
        # the agent's own disk code, on one tree: the source host keeps it in a btrfs
        # subvolume, seen by a dir host and a btrfs host (same root, two backends)
        src_btrfs = HostDisks(src_fs / "disks", "btrfs", work / "s1", "s1")
        src_dir = HostDisks(src_fs / "disks", "dir", work / "s2", "s2")
        dst_dir = HostDisks(work / "dst-dir", "dir", work / "d1", "d1")
        dst_btrfs = HostDisks(dst_fs / "disks", "btrfs", work / "d2", "d2")
        hosts = [src_btrfs, src_dir, dst_dir, dst_btrfs]
        for h in hosts:
            h.ticket_key = tickets.public_hex(KEY)
            await h.start()
        root = src_btrfs.publish("web", src_btrfs.new_dir("web"))
        t0 = time.monotonic()
        files = build_tree(root, args.size_mb)
        print(f"tree: {len(files):,} files, {args.size_mb} MB, built in "
              f"{time.monotonic() - t0:.1f}s", flush=True)

        def slot(h: HostDisks, name: str) -> dict[str, object]:
            return {**h.recv_prepare(name, "standby"), "address": "127.0.0.1", "port": h.port,
                    "host": h.host, "slot": "standby"}

        def ticket(src: HostDisks, dst: HostDisks, name: str) -> str:
            return tickets.issue(KEY, name, "standby", source=src.host, target=dst.host,
                                 ttl=3600)

        recipe = dst_dir.slot("recipe", "standby")
        recipe.mkdir(parents=True)
        ep = Endpoint("127.0.0.1", dst_dir.port, str(recipe),
                      ticket=ticket(src_dir, dst_dir, "recipe"))

        (work / "w").mkdir()
        spec = Spec(name="writer", command=["sh", "-c", WRITER], workdir=str(work / "w"),
                    rootfs=str(root))
        handle = drv.start(drv.create(spec))
        h = handle

        async def freeze() -> None:
            await asyncio.to_thread(drv.freeze, h)

        async def thaw() -> None:
            await asyncio.to_thread(drv.thaw, h)

        async def refresh(src: HostDisks, dst: HostDisks) -> tuple[float, int]:
            tgt = slot(dst, "web")
            live = await src.send("web", tgt, "live", "", None, None,
                                  ticket=ticket(src, dst, "web"))
            frozen = await src.send("web", tgt, "frozen", live.gen, freeze, thaw,
                                    ticket=ticket(src, dst, "web"))
            dst.prune_received("web", "standby")
            return (frozen.freeze_ms or 0.0) / 1000, live.bytes_sent + frozen.bytes_sent

        # initial copies, not measured as refreshes
        await refresh(src_dir, dst_dir)
        await refresh(src_btrfs, dst_btrfs)
        await run_pass(root, ep)
        rnd = random.Random(2)
        rows = []
        for label, src, dst in (("corral dir", src_dir, dst_dir),
                                ("corral btrfs", src_btrfs, dst_btrfs)):
            change(files, args.changes, rnd)
            start = time.monotonic()
            frozen_s, moved = await refresh(src, dst)
            rows.append((label, frozen_s, time.monotonic() - start, moved))

        # the recipe: rsync live, suspend, rsync again (full scan), resume
        change(files, args.changes, rnd)
        start = time.monotonic()
        first = await run_pass(root, ep)
        await freeze()
        f0 = time.monotonic()
        try:
            second = await run_pass(root, ep)
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
        for host in hosts:
            await host.stop()
        for m in reversed(mounts):
            if subprocess.run(["umount", str(m)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(m)], capture_output=True)
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
