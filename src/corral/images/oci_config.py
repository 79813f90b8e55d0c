"""An image's runtime config: what a pull keeps of it, and how a run resolves it.

A pull keeps the part of the OCI config that says how to run the image (``RUN_KEYS``) in the
manifest's ``meta``; the server resolves it when an instance is created (``resolve``), so every
agent gets a finished process to run (argv, environment, user ids, working directory, stop
signal) and never reads an image's config or its ``/etc/passwd`` itself. What was resolved is
kept with the instance, so a migrated, recreated or unshelved copy runs the same process even
if the image has since been replaced or removed.

The rules are Docker's: the command after ``--`` replaces Cmd; an entrypoint given replaces the
image's Entrypoint and drops its Cmd; ``-e`` is laid over Env; User is ``user[:group]``, each a
number or a name looked up in the image's ``/etc/passwd`` and ``/etc/group`` (a user's primary
group when none is given, and the groups listing it as supplementary ones); HOME comes from the
user's passwd entry unless Env sets it.
"""

from __future__ import annotations

import posixpath
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.errors import InvalidRequest
from corral.images.packstore import PackStore
from corral.images.tree import Manifest

#: the config keys a pull keeps (the rest of a config says how it was built, not how to run it)
RUN_KEYS = ("Entrypoint", "Cmd", "Env", "User", "WorkingDir", "StopSignal", "ExposedPorts",
            "Healthcheck", "Labels")
#: a container's ids are 0..65535 (drivers/runc_userns.py maps no others)
MAX_ID = 65535
#: the largest /etc/passwd or /etc/group read
FILE_LIMIT = 1024 * 1024
_HINT = "the image's config is damaged; pull it again"


def run_config(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of an OCI config's ``config`` object that say how to run it, checked so the
    server can trust their types later."""
    out: dict[str, Any] = {}
    for key in RUN_KEYS:
        value = config.get(key)
        if value in (None, "", [], {}):
            continue
        if key in ("Entrypoint", "Cmd", "Env"):
            _strings(key, value)
        elif key in ("User", "WorkingDir", "StopSignal"):
            if not isinstance(value, str):
                raise InvalidRequest(f"image config: {key} is not a string", hint=_HINT)
        elif not isinstance(value, dict):
            raise InvalidRequest(f"image config: {key} is not an object", hint=_HINT)
        out[key] = value
    return out


def _strings(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "\x00" not in v
                                              for v in value):
        raise InvalidRequest(f"image config: {key} is not a list of strings", hint=_HINT)
    return list(value)


@dataclass(frozen=True)
class Resolved:
    """A run's process as the image and the request decide it."""

    command: list[str]
    env: dict[str, str]
    #: what the instance keeps (``Instance.image_config``): the process fields the agent gets
    #: (uid, gid, additional_gids, cwd, stop_signal) and what ``corral show`` shows (user,
    #: exposed_ports, healthcheck); None when no image config says anything
    process: dict[str, Any] | None


#: reads a file of the image by its path from the root ("etc/passwd"): its bytes, or None
ReadFile = Callable[[str], bytes | None]


def resolve(config: dict[str, Any] | None, *, command: list[str],
            entrypoint: list[str] | None, env: dict[str, str], driver: str,
            read_file: ReadFile | None = None) -> Resolved:
    cfg = run_config(config or {})
    image_entry = _strings("Entrypoint", cfg.get("Entrypoint"))
    image_cmd = _strings("Cmd", cfg.get("Cmd"))
    if entrypoint is not None:  # Docker: an entrypoint given drops the image's Cmd as well
        argv = list(entrypoint) + list(command)
    else:
        argv = image_entry + (list(command) or image_cmd)
    if not argv:
        raise InvalidRequest("no command to run: the image has neither Entrypoint nor Cmd",
                             hint="put the command after --, e.g. corral run web --image "
                                  "IMAGE -- /bin/sh -c '...'")
    merged: dict[str, str] = {}
    for item in _strings("Env", cfg.get("Env")):
        key, eq, value = item.partition("=")
        if key and eq:
            merged[key] = value
    if not cfg:
        merged.update(env)
        return Resolved(argv, merged, None)
    user = str(cfg.get("User") or "")
    if user and driver == "process" and user not in ("0", "root", "0:0", "root:root"):
        raise InvalidRequest(f"the image runs as user {user!r}, which the process driver "
                             "cannot do (it runs workloads as the agent's user)",
                             hint="run it with --driver runc")
    uid, gid, extra, home = resolve_user(user, read_file)
    if home and "HOME" not in merged:
        merged["HOME"] = home
    merged.update(env)
    process: dict[str, Any] = {
        "uid": uid, "gid": gid, "additional_gids": extra, "user": user or "root",
        "cwd": _workdir(str(cfg.get("WorkingDir") or "")),
        "stop_signal": stop_signal(str(cfg.get("StopSignal") or "")),
        "exposed_ports": sorted(str(p) for p in cfg.get("ExposedPorts") or {}),
        "healthcheck": cfg.get("Healthcheck") or None,
    }
    return Resolved(argv, merged, process)


def _workdir(path: str) -> str:
    if not path:
        return ""
    if "\x00" in path or len(path) > 4095:
        raise InvalidRequest(f"the image's WorkingDir {path[:80]!r} is not a path", hint=_HINT)
    return posixpath.normpath(posixpath.join("/", path))


def stop_signal(text: str) -> int:
    """A StopSignal (``SIGTERM``, ``TERM``, ``15``, ``SIGRTMIN+3``) as a number; 0 for none."""
    if not text:
        return 0
    name = text.strip().upper()
    try:
        if name.isdigit():
            number = int(name)
        else:
            name = name if name.startswith("SIG") else "SIG" + name
            base, plus, offset = name.partition("+")
            number = int(signal.Signals[base]) + (int(offset) if plus else 0)
    except (KeyError, ValueError):
        number = 0
    if not 1 <= number <= 64:
        raise InvalidRequest(f"the image's StopSignal {text[:40]!r} is not a signal",
                             hint="a signal name or number, e.g. SIGTERM or 15")
    return number


# --- users and groups ---------------------------------------------------------------------------


def _table(raw: bytes | None) -> list[list[str]]:
    if not raw:
        return []
    return [line.split(":") for line in raw.decode(errors="replace").splitlines()
            if line and not line.startswith("#")]


def _id(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def resolve_user(user: str, read_file: ReadFile | None
                 ) -> tuple[int, int, list[int], str]:
    """(uid, gid, supplementary gids, home) of an image's ``user[:group]``; root without one."""
    name, _, group = user.partition(":")
    read = read_file or (lambda _path: None)
    passwd = [r for r in _table(read("etc/passwd")) if len(r) >= 7 and _id(r[2]) is not None]
    groups = [r for r in _table(read("etc/group")) if len(r) >= 3 and _id(r[2]) is not None]
    entry: list[str] | None = None
    if not name:
        uid = 0
        entry = next((r for r in passwd if _id(r[2]) == 0), None)
    elif name.isdigit():
        uid = int(name)
        entry = next((r for r in passwd if _id(r[2]) == uid), None)
    else:
        entry = next((r for r in passwd if r[0] == name), None)
        if entry is None:
            raise InvalidRequest(f"the image's user {name!r} is not in its /etc/passwd",
                                 hint="the image is broken; give it a user by number")
        uid = int(entry[2])
    if not group:
        gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    elif group.isdigit():
        gid = int(group)
    else:
        found = next((r for r in groups if r[0] == group), None)
        if found is None:
            raise InvalidRequest(f"the image's group {group!r} is not in its /etc/group",
                                 hint="the image is broken; give it a group by number")
        gid = int(found[2])
    extra: list[int] = []
    if entry is not None:
        for r in groups:
            g = int(r[2])
            if entry[0] in r[3].split(",") and g != gid and g not in extra:
                extra.append(g)
    if uid > MAX_ID or gid > MAX_ID or any(g > MAX_ID for g in extra):
        raise InvalidRequest(f"the image's user {user!r} has ids past {MAX_ID}, which no "
                             "container has", hint="use an image whose user has ids below 65536")
    return uid, gid, extra, entry[5] if entry is not None else ""


# --- reading a file of a stored tree ------------------------------------------------------------


def read_tree_file(manifest: Manifest, packs: PackStore, path: str,
                   limit: int = FILE_LIMIT) -> bytes | None:
    """The bytes of ``path`` in the tree, symlinks resolved inside the tree as the container
    would see them (an absolute target starts at the tree's root, ``..`` stops there); None
    when it is missing, not a regular file, or larger than ``limit``."""
    by_path = {e.path: e for e in manifest.entries}
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        e = by_path.get("/".join([*done, part]))
        if e is None:
            return None
        if e.kind == "l":
            hops += 1
            if hops > 40:
                return None
            target = [p for p in e.target.split("/") if p not in ("", ".")]
            done = [] if e.target.startswith("/") else done
            todo = target + todo
            continue
        done.append(part)
    e = by_path.get("/".join(done))
    if e is not None and e.kind == "h":
        e = by_path.get(e.target)
    if e is None or e.kind != "f" or e.size > limit:
        return None
    buf = bytearray(e.size)
    for off, ids in e.extents:
        pos = int(off)
        for cid in ids:
            data = packs.get(bytes.fromhex(cid))
            buf[pos:pos + len(data)] = data
            pos += len(data)
    return bytes(buf[:e.size])
