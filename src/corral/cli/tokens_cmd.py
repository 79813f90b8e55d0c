"""``corral token create/ls/rm``: named API tokens with a role.

``create`` prints the token alone on stdout (``TOKEN=$(corral token create ci)`` works) and
what it is on stderr: the server keeps only a hash of it, so this is the one time it is seen.
"""

from __future__ import annotations

import time

from corral.cli import render
from corral.cli.app import UsageError, client


def create(name: str, read_only: bool, role: str | None, json_out: bool) -> None:
    if read_only and role not in (None, "read-only"):
        raise UsageError(f"--read-only and --role {role} disagree",
                         "usage: corral token create NAME [--read-only | --role ROLE]\n",
                         "corral token create")
    chosen = "read-only" if read_only else role or "admin"
    with client() as c:
        made = c.token_create(name, chosen)
    if json_out:
        render.print_json(made)
        return
    render.say(f"{name}: {chosen} token, shown this once (only a hash of it is kept)",
               stderr=True)
    print(made["token"])


def ls(json_out: bool) -> None:
    with client() as c:
        rows = c.tokens_data()
    if json_out:
        render.print_json(rows)
        return
    if not rows:
        render.say("no named tokens (the fleet token in DATA/token is the admin's); make one "
                   "with: corral token create NAME --read-only")
        return
    now = time.time()
    width = max(len(r["name"]) for r in rows)
    render.say(f"{'NAME'.ljust(width)}  {'ROLE':9}  AGE")
    for r in rows:
        render.say(f"{r['name'].ljust(width)}  {r['role']:9}  "
                   f"{_age(now - float(r['created_at']))}")


def rm(name: str) -> None:
    with client() as c:
        c.token_revoke(name)
    render.say(f"{name}: revoked")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"
