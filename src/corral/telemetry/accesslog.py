"""Access-log lines (Common and Combined Log Format) into hits for the live index.

Parsing is done by ``apachelogs`` (a real parser of Apache's format strings), not by a regex of
our own; a line that fits neither format is counted, never fatal: one bad writer must not stop the
view of everyone else's traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import apachelogs

_PARSERS = (apachelogs.LogParser(apachelogs.COMBINED), apachelogs.LogParser(apachelogs.COMMON))


@dataclass(frozen=True)
class Hit:
    client: str
    path: str
    status: int
    ts: float


class AccessLogReader:
    """Turns lines into :class:`Hit`; keeps ``bad`` (how many lines were not access-log lines)."""

    def __init__(self) -> None:
        self.bad = 0
        self.good = 0

    def parse(self, line: str) -> Hit | None:
        line = line.rstrip("\r\n")
        for parser in _PARSERS:
            try:
                entry = parser.parse(line)
            except (apachelogs.InvalidEntryError, ValueError):
                continue
            request = entry.request_line or ""
            parts = request.split(" ")
            target = parts[1] if len(parts) >= 2 else "/"
            status = entry.final_status
            when = entry.request_time
            if status is None or when is None:
                break
            self.good += 1
            return Hit(
                client=str(entry.remote_host),
                path=urlsplit(target).path or "/",
                status=int(status),
                ts=when.timestamp(),
            )
        self.bad += 1
        return None
