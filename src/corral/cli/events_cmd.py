"""``corral events``: the fleet's event stream, past and (with ``-f``) live."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from corral.api.timespec import iso, parse_since
from corral.cli.app import client

COLUMNS = "{:>7}  {:<24}  {:<18}  {:<10}  {:<16}  {}"


def describe(ev: Mapping[str, Any]) -> str:
    """The short 'what happened' column."""
    d = ev.get("data") or {}
    if ev["type"] == "instance.state":
        text = f"{d.get('from')} -> {d.get('to')} ({d.get('cause')})"
        if d.get("exit_code") is not None:
            text += f" exit {d['exit_code']}"
        return text
    if ev["type"] == "instance.error":
        return f"{d.get('verb')}: {d.get('code')}: {d.get('message')}"
    return " ".join(f"{k}={_short(v)}" for k, v in d.items() if v is not None)


def _short(v: Any) -> str:
    text = str(v)
    return text if len(text) <= 40 else text[:39] + "…"


def line(ev: Mapping[str, Any]) -> str:
    return COLUMNS.format(ev.get("index", 0), iso(ev["ts"]), ev["type"], ev.get("host") or "-",
                          ev.get("instance") or "-", describe(ev))


def events(follow: bool, since: str | None, after: int | None, type_: list[str] | None,
           instance: str | None, json_out: bool) -> None:
    """``--json`` passes on each event as the server wrote it (one JSON object a line)."""
    start = None if since is None else iso(parse_since(since, time.time()))
    header = not json_out
    with client(timeout=30) as c:
        try:
            for raw in c.event_lines(since=start, after=after, follow=follow, types=type_,
                                     instance=instance):
                if json_out:
                    sys.stdout.write(raw + "\n")
                else:
                    if header:
                        print(COLUMNS.format("INDEX", "TIME", "TYPE", "HOST", "INSTANCE",
                                             "WHAT"))
                        header = False
                    sys.stdout.write(line(json.loads(raw)) + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            return
