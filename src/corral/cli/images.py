"""Image commands: import a tree or tarball, pull and push standard images, list with dedup
figures, remove, collect garbage.

``image import`` chunks the tree here, next to the files, and uploads only the chunks the
server lacks (the same path an agent uses to shelve a disk), so importing a second image built
on the same base sends almost nothing. ``image pull`` does the same with a registry's image
(:mod:`corral.images.oci`): skopeo copies it here, its layers are checked and applied here, and
the server gets only the chunks it lacks and, last, the name; ``image push`` fetches the
image's chunks and hands skopeo an OCI layout of it.

The image store's chunking code (lmdb, blake3, zstd) is imported by ``image import`` alone; the
routes are spoken by the API client, so no image command loads the server's web framework.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from corral.cli import render
from corral.cli.app import client
from corral.errors import Conflict, InvalidRequest

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


def _bar() -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("{task.description:<10}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeElapsedColumn(), console=render.err())


def default_name(ref: str) -> str:
    """``docker://reg:5000/team/web:1.2`` -> ``web:1.2``; a path's last part otherwise."""
    rest = ref.split("://", 1)[1] if "://" in ref else ref.split(":", 1)[1]
    rest = rest.split("@", 1)[0].rstrip("/")
    last = rest.rsplit("/", 1)[-1]
    if ref.startswith("docker://"):
        return last if ":" in last else f"{last}:latest"
    base, _, tag = last.partition(":")  # oci:DIR:TAG
    for suffix in (".tar.gz", ".tgz", ".tar"):
        base = base.removesuffix(suffix)
    return f"{base}:{tag}" if tag else base


def pull(ref: str, name: str | None, authfile: str | None, insecure: bool,
         replace: bool) -> None:
    """Everything is checked here before the server hears of the image: a failed pull leaves
    nothing in the fleet's store (see corral.images.oci)."""
    from corral.api.names import check
    from corral.images.oci import pull as pull_image
    from corral.images.oci import upload
    from corral.images.packstore import PackStore

    if name is None:
        try:
            name = check("image", default_name(ref))
        except ValueError as exc:
            raise InvalidRequest(f"no image name can be made of {ref[:120]!r}: {exc}",
                                 hint="name it: --name NAME") from None
    with client(timeout=TIMEOUT) as c:
        if not replace and any(r["name"] == name for r in c.images_data()):
            raise Conflict(f"image '{name}' exists", hint="pick another --name or pass "
                                                          "--replace")
    with tempfile.TemporaryDirectory(prefix="corral-pull-") as tmp, _bar() as bar:
        work = Path(tmp)
        fetch = bar.add_task("fetching", total=None)
        apply = bar.add_task("layers", total=None, start=False)
        packs = PackStore(work / "chunks")
        try:
            manifest = pull_image(
                ref, work, packs, authfile=authfile, insecure=insecure,
                on_total=lambda n: bar.update(fetch, total=n),
                on_fetch=lambda n: bar.update(fetch, completed=n),
                on_layers=lambda n: bar.advance(apply, n))
            bar.update(fetch, total=bar.tasks[fetch].completed)
            bar.update(apply, total=bar.tasks[apply].completed)
            bar.start_task(apply)
            shutil.rmtree(work / "layout")  # read whole: its chunks are what is sent now
            send = bar.add_task("uploading", total=_bytes(packs, manifest))
            with client(timeout=TIMEOUT) as c:
                up = upload(c, packs, manifest, name, replace=replace,
                                on_bytes=lambda n: bar.advance(send, n))
            bar.update(send, total=bar.tasks[send].completed)
        finally:
            packs.close()
    meta = manifest.meta
    render.say(f"{name}: pulled {meta['source']} ({meta['digest'][:19]}…), "
               f"{meta['layers']} layer(s), {render.fmt_bytes(manifest.size())} of files; "
               f"{up.chunks} new chunks, {render.fmt_bytes(up.bytes)} sent")


def _bytes(packs: Any, manifest: Any) -> int:
    """Compressed bytes of the manifest's chunks: the most an upload sends."""
    total = 0
    for cid in manifest.chunk_ids():
        loc = packs.locate(bytes.fromhex(cid))
        total += loc.comp_len if loc else 0
    return total


def push(name: str, ref: str, authfile: str | None, insecure: bool) -> None:
    from corral.images.oci_push import push as push_image
    from corral.images.packstore import PackStore

    if name.startswith("@"):
        raise InvalidRequest(f"'{name}' is a shelved instance's disk, not an image",
                             hint="push an image (see 'corral image ls')")
    with tempfile.TemporaryDirectory(prefix="corral-push-") as tmp, _bar() as bar:
        got = bar.add_task("chunks", total=None)
        build = bar.add_task("layer", total=None)
        packs = PackStore(Path(tmp) / "chunks")
        try:
            with client(timeout=TIMEOUT) as c:
                digest = push_image(
                    c, name, ref, Path(tmp), packs, authfile=authfile, insecure=insecure,
                    on_fetch=lambda n: bar.update(got, completed=n),
                    on_layer=lambda n: bar.advance(build, n))
        finally:
            packs.close()
        bar.update(got, total=bar.tasks[got].completed)
        bar.update(build, total=bar.tasks[build].completed)
    render.say(f"{name}: pushed to {ref} ({digest[:19]}…)")


def ls(json_out: bool) -> None:
    with client(timeout=TIMEOUT) as c:
        rows = c.images_data()
    if json_out:
        render.print_json(rows)
        return
    from rich.table import Table

    t = Table(box=None)
    for col in ("NAME", "SOURCE", "DIGEST", "FILES", "SIZE", "UNIQUE", "DEDUP"):
        t.add_column(col, justify="left" if col in ("NAME", "SOURCE", "DIGEST") else "right")
    for r in rows:
        digest = r.get("digest") or ""
        t.add_row(r["name"], r.get("source") or "-", digest[:19] or "-", str(r["files"]),
                  render.fmt_bytes(r["size"]), render.fmt_bytes(r["unique_size"]),
                  f"{r['dedup_ratio']:.2f}x")
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
