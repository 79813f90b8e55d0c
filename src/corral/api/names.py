"""Which names and paths the API takes, in one place, without pydantic.

Names end up in URLs, bus subjects, database keys, log lines and (instances) directory names,
so each kind is a plain pattern: no ``/``, no ``..``, no NUL, no newline or other control
character, no unicode look-alikes, and a length the database column holds. The wire models
(:mod:`corral.api.models`) put the patterns in the OpenAPI document; the CLI checks the names
typed on its command line with :func:`check` before it connects (exit 2), at the cost of one
regular expression, so a hostile name never reaches a server at all.
"""

from __future__ import annotations

import re

#: instances: a DNS label (it names a directory, a cgroup and a bus subject token)
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
#: hosts: a bus subject token and a database key (String(64)); as ``api/hosts.py`` has it
HOST_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
#: images of the store; ``@`` starts only the server's own shelved-disk names
IMAGE_PATTERN = r"^@?[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$"
#: API tokens (a host's token may be named after its host)
TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: a path the API takes (rootfs, tail files): what Linux' PATH_MAX holds
MAX_PATH = 4096

KINDS: dict[str, tuple[str, str]] = {
    "instance": (NAME_PATTERN, "lowercase letters, digits and '-' (at most 63, not starting "
                               "or ending with '-')"),
    "host": (HOST_PATTERN, "letters, digits, '_' and '-' (at most 63)"),
    "image": (IMAGE_PATTERN, "letters, digits, '.', '_', ':' and '-' (at most 200, starting "
                             "with a letter or digit)"),
    "token": (TOKEN_NAME_PATTERN, "letters, digits, '.', '_' and '-' (at most 64, starting "
                                  "with a letter or digit)"),
}


def valid(kind: str, name: str) -> bool:
    # fullmatch, not match: ``$`` also matches before a final newline
    return re.fullmatch(KINDS[kind][0].strip("^$"), name) is not None


def check(kind: str, name: str) -> str:
    """``name`` if it is a valid ``kind`` name, else ValueError saying what one looks like."""
    if not valid(kind, name):
        raise ValueError(f"{kind} name {_shown(name)} is not valid: use {KINDS[kind][1]}")
    return name


def path_problem(path: str, dotdot: bool = False) -> str | None:
    """Why ``path`` cannot be taken as a path on a host (None when it can): control
    characters (NUL, newline) break argv, logs and the agent's records; ``..`` leaves the
    place the path is meant to stay in (unless ``dotdot``: a path resolved before it is
    used); past PATH_MAX no system call takes it."""
    if len(path) > MAX_PATH:
        return f"is longer than {MAX_PATH} characters"
    if "\0" in path:
        return "contains a NUL byte"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "contains a control character (a newline, a tab...)"
    if not dotdot and ".." in path.split("/"):
        return "contains '..'"
    return None


def _shown(name: str) -> str:
    """A name as an error message quotes it: escaped, and cut when very long."""
    text = repr(name[:80])
    return text + ("..." if len(name) > 80 else "")
