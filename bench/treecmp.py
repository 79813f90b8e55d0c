"""Is this copy of a tree the same tree? Shared by bench/standby.py and bench/unshelve.py, so
every method a bench compares (corral's and its baseline's) is checked by the same function.

A tree is reduced to one entry per path: its kind, permission bits, numeric owner, size and,
for a file, a BLAKE2b of its content (for a symlink, its target). Times are left out: a copy
that keeps content but not mtimes is still a correct copy for a standby or an unshelve.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

#: (kind, mode bits, uid, gid, size, content digest or link target)
Entry = tuple[str, int, int, int, int, str]


def _digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "blake2b").hexdigest()[:32]


def manifest(root: Path, exclude: Iterable[str] = ()) -> dict[str, Entry]:
    """Every path below ``root`` (relative, root itself as ``.``), symlinks not followed.
    ``exclude`` holds relative paths left out with everything below them."""
    skip = set(exclude)
    out: dict[str, Entry] = {}
    base = str(root)
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base)
        dirnames[:] = [d for d in dirnames
                       if os.path.normpath(os.path.join(rel_dir, d)) not in skip]
        for name in (".", *dirnames, *filenames) if rel_dir == "." else (*dirnames, *filenames):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in skip:
                continue
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                out[rel] = ("file", perm, st.st_uid, st.st_gid, st.st_size, _digest(full))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, st.st_uid, st.st_gid, 0, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", perm, st.st_uid, st.st_gid, 0, "")
            else:
                out[rel] = ("other", perm, st.st_uid, st.st_gid, 0, str(st.st_rdev))
    return out


def tree_hash(root: Path, exclude: Iterable[str] = ()) -> str:
    """One digest for the whole tree: equal trees (by :func:`manifest`) have equal hashes."""
    h = hashlib.blake2b(digest_size=16)
    for rel, entry in sorted(manifest(root, exclude).items()):
        h.update(repr((rel, entry)).encode())
    return h.hexdigest()


def differences(want: dict[str, Entry], got: dict[str, Entry], limit: int = 10) -> list[str]:
    """What ``got`` lacks, has extra or has otherwise, at most ``limit`` lines."""
    out: list[str] = []
    for rel in sorted(want.keys() | got.keys()):
        if len(out) >= limit:
            out.append("...")
            break
        a, b = want.get(rel), got.get(rel)
        if a == b:
            continue
        if b is None:
            out.append(f"missing {rel}")
        elif a is None:
            out.append(f"extra {rel}")
        else:
            fields = ("kind", "mode", "uid", "gid", "size", "content")
            what = [f"{f} {x!r}->{y!r}" for f, x, y in zip(fields, a, b, strict=True) if x != y]
            out.append(f"differs {rel}: {', '.join(what)}")
    return out


def check(want: dict[str, Entry], copy: Path, what: str, exclude: Iterable[str] = ()) -> int:
    """Raise if ``copy`` is not the tree ``want`` (a :func:`manifest` taken earlier, e.g.
    before the original went away); return how many paths were checked."""
    diff = differences(want, manifest(copy, exclude))
    if diff:
        raise AssertionError(f"{what}: {copy} is not the tree it should be:\n  " +
                             "\n  ".join(diff))
    return len(want)


def compare(src: Path, copy: Path, what: str, exclude: Iterable[str] = ()) -> int:
    """Raise if ``copy`` is not the same tree as ``src``; return how many paths were checked."""
    ex = list(exclude)
    return check(manifest(src, ex), copy, f"{what} (source {src})", ex)
