"""Image commands: import a tree or tarball, list with dedup figures, remove, collect garbage.

``image import`` chunks the tree here, next to the files, and uploads only the chunks the
server lacks (the same path an agent uses to shelve a disk), so importing a second image built
on the same base sends almost nothing.

The image store's chunking code (lmdb, blake3, zstd) is imported by ``image import`` alone; the
routes are spoken by the API client, so no image command loads the server's web framework.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from corral.cli import render
from corral.cli.app import client
from corral.errors import InvalidRequest

#: an import sends many batches, a gc rewrites packs: each answer may take a while
TIMEOUT = 300.0


def import_(name: str, path: Path, replace: bool) -> None:
    """Chunks are cut here, next to the files, in a scratch store that is thrown away."""
    path = path.expanduser()
    if not path.exists():
        raise InvalidRequest(f"{path} does not exist", hint="give a directory or a tar archive")
    from corral.images.packstore import PackStore
    from corral.images.transfer import push_tree

    scratch = tempfile.TemporaryDirectory(prefix="corral-chunks-")  # chunked here, then sent
    cache = PackStore(Path(scratch.name))
    try:
        with client(timeout=TIMEOUT) as c:
            if path.is_dir():
                stats = push_tree(c, cache, path, name, replace=replace)
            else:
                with tempfile.TemporaryDirectory(prefix="corral-import-") as tmp:
                    proc = subprocess.run(["tar", "-x", "--numeric-owner", "-p", "-f",
                                           str(path), "-C", tmp], capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise InvalidRequest(f"cannot unpack {path}: {proc.stderr.strip()[-300:]}",
                                             hint="give a tar archive or a directory")
                    stats = push_tree(c, cache, Path(tmp), name, replace=replace)
    finally:
        cache.close()
        scratch.cleanup()
    render.say(f"{name}: imported, {stats.chunks} new chunks, "
               f"{render.fmt_bytes(stats.bytes)} sent")


def ls(json_out: bool) -> None:
    with client(timeout=TIMEOUT) as c:
        rows = c.images_data()
    if json_out:
        render.print_json(rows)
        return
    from rich.table import Table

    t = Table(box=None)
    for col in ("NAME", "FILES", "SIZE", "UNIQUE", "DEDUP"):
        t.add_column(col, justify="left" if col == "NAME" else "right")
    for r in rows:
        t.add_row(r["name"], str(r["files"]), render.fmt_bytes(r["size"]),
                  render.fmt_bytes(r["unique_size"]), f"{r['dedup_ratio']:.2f}x")
    render.out().print(t)


def rm(names: list[str]) -> None:
    with client(timeout=TIMEOUT) as c:
        for n in names:
            c.image_remove(n)
            render.say(f"{n}: removed")


def verify(json_out: bool) -> None:
    """Damage is a failure of the command (exit 11), so scripts and cron notice it."""
    with client(timeout=TIMEOUT) as c:
        damaged = c.image_verify(timeout=3600.0)["damaged"]
    if json_out:
        render.print_json(damaged)
    elif not damaged:
        render.say("every chunk reads back intact")
    else:
        for d in damaged:
            render.say(f"pack {d['pack']} offset {d['offset']}: chunk {d['chunk'][:16]}"
                       f"… {d['reason']}; breaks: {', '.join(d['images']) or 'no image'}",
                       stderr=True)
    if damaged:
        raise SystemExit(11)


def gc(json_out: bool) -> None:
    with client(timeout=TIMEOUT) as c:
        res = c.image_gc()
    if json_out:
        render.print_json(res)
    else:
        render.say(f"dropped {res['dropped']} chunks, rewrote {res['packs_rewritten']} "
                   f"packs, freed {render.fmt_bytes(res['bytes_freed'])}")
