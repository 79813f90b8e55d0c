"""Image commands: import a tree or tarball, list with dedup figures, remove, collect garbage.

``image import`` chunks the tree here, next to the files, and uploads only the chunks the
server lacks (the same path an agent uses to shelve a disk), so importing a second image built
on the same base sends almost nothing.

The image store's chunking and upload code is imported by ``image import`` alone: it shares
modules with the server's image routes (FastAPI), which no other command should load.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from corral.cli import render
from corral.cli.app import JSON_HELP
from corral.errors import CorralError, InvalidRequest

if TYPE_CHECKING:
    import httpx

commands = typer.Typer()
image_app = typer.Typer(help="Images: content-addressed root filesystems.", no_args_is_help=True)
commands.add_typer(image_app, name="image")
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]


@contextlib.contextmanager
def _http() -> Iterator[httpx.Client]:
    """A client of the image routes; a server that cannot be reached is a CorralError with the
    client's hint (not an httpx traceback)."""
    import httpx

    from corral.rig.context import resolve

    url, token = resolve()
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                          timeout=httpx.Timeout(300.0, connect=10.0)) as c:
            yield c
    except httpx.TransportError as exc:
        from corral.api.client import UNREACHABLE_HINT

        raise CorralError(f"cannot reach the corral server at {url}: {exc}",
                          hint=UNREACHABLE_HINT, retryable=True) from exc


@image_app.command("import")
def import_(
    name: Annotated[str, typer.Argument(help="image name")],
    path: Annotated[Path, typer.Argument(help="a root directory or a tar archive")],
    replace: Annotated[bool, typer.Option(help="replace an image of that name")] = False,
) -> None:
    """Import a directory or tarball as an image (uploads only the chunks the store lacks)."""
    path = path.expanduser()
    if not path.exists():
        raise InvalidRequest(f"{path} does not exist", hint="give a directory or a tar archive")
    from corral.images.fetch import push_tree
    from corral.images.packstore import PackStore

    scratch = tempfile.TemporaryDirectory(prefix="corral-chunks-")  # chunked here, then sent
    cache = PackStore(Path(scratch.name))
    try:
        with _http() as c:
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
    render.out().print(f"{name}: imported, {stats.chunks} new chunks, "
                       f"{render.fmt_bytes(stats.bytes)} sent")


@image_app.command("ls")
def ls(json_out: JsonOpt = False) -> None:
    """Images with their size, unique size and dedup ratio."""
    with _http() as c:
        resp = c.get("/v1/images")
        _check(resp)
        rows = resp.json()
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


@image_app.command("rm")
def rm(names: Annotated[list[str], typer.Argument(help="image name(s)")]) -> None:
    """Remove images (their chunks are freed by 'corral image gc')."""
    with _http() as c:
        for n in names:
            _check(c.delete(f"/v1/images/{n}"))
            render.out().print(f"{n}: removed")


@image_app.command("verify")
def verify(json_out: JsonOpt = False) -> None:
    """Read back every stored chunk; list damage and the images it breaks (exit 11 if any)."""
    import httpx

    with _http() as c:
        resp = c.post("/v1/images/verify", timeout=httpx.Timeout(3600.0, connect=10.0))
        _check(resp)
        damaged = resp.json()["damaged"]
    if json_out:
        render.print_json(damaged)
    elif not damaged:
        render.out().print("every chunk reads back intact")
    else:
        for d in damaged:
            render.err().print(f"pack {d['pack']} offset {d['offset']}: chunk {d['chunk'][:16]}"
                               f"… {d['reason']}; breaks: {', '.join(d['images']) or 'no image'}")
    if damaged:
        raise typer.Exit(11)


@image_app.command("gc")
def gc(json_out: JsonOpt = False) -> None:
    """Free the chunks no image uses any more."""
    with _http() as c:
        resp = c.post("/v1/images/gc")
        _check(resp)
        res = resp.json()
    if json_out:
        render.print_json(res)
    else:
        render.out().print(f"dropped {res['dropped']} chunks, rewrote {res['packs_rewritten']} "
                           f"packs, freed {render.fmt_bytes(res['bytes_freed'])}")


def _check(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        from corral.api.client import error_from_response

        raise error_from_response(resp)
