"""Access-log lines (Common and Combined Log Format) into hits for the live index.

Parsing is done by ``apachelogs`` (a real parser of Apache's format strings), not by a regex of
our own; a line that fits neither format is counted, never fatal: one bad writer must not stop the
view of everyone else's traffic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import apachelogs

_COMBINED = apachelogs.LogParser(apachelogs.COMBINED)
_COMMON = apachelogs.LogParser(apachelogs.COMMON)
_PARSERS = (_COMBINED, _COMMON)
#: the end a Common line must have: `` %>s %b`` (a status of 3 digits or "-", a size)
_COMMON_STATUS_END = re.compile(r" (?:[0-9]{3}|-)\Z")
_COMMON_SIZE = re.compile(r"0|-?[1-9][0-9]*|-")


def _could_match(parser: apachelogs.LogParser, line: str) -> bool:
    """Whether ``line`` ends as ``parser``'s format must: apachelogs' patterns backtrack, and
    finding that a line fits neither cost 120-660 us (a line of the Combined format with one
    field appended, as nginx configs often log, was 260 us: the server's traffic feed, on its
    event loop, held every live log follower to ~4,500 lines/s). A line failing this check
    would fail the parser too (both formats end in fixed fields), so nothing parses
    differently."""
    line = line.rstrip("\r\n")  # as the parser does
    if parser is _COMBINED:
        return line.endswith('"')
    head, space, size = line.rpartition(" ")
    return bool(space) and _COMMON_SIZE.fullmatch(size) is not None \
        and _COMMON_STATUS_END.search(head[-4:]) is not None


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
            if not _could_match(parser, line):
                continue
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
