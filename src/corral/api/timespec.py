"""``--since`` values: a duration back from now (``90s``, ``10m``, ``2h``, ``1d``), an ISO 8601
time, or unix seconds.

Shared by the CLI (to refuse a bad value before any request) and the server (which accepts the
same forms in ``?since=``), so both read the text the same way.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from corral.errors import InvalidRequest

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: the latest time a ``since`` may name: what a datetime can hold (the end of the year 9999)
LATEST = 253402300799.0
HINT = "use a duration back from now (30s, 10m, 2h, 1d), an ISO time (2026-11-23T12:00:00Z) " \
       "or unix seconds"


def parse_since(text: str, now: float | None = None) -> float:
    """Unix seconds meant by ``text``; a time without a zone is taken as UTC. A time before
    1970 is 1970 (everything kept); one past :data:`LATEST`, or not a number, is refused: a
    server reading a stream from it failed after its answer had begun (an empty body)."""
    value = _parse(text, now)
    if value != value or value > LATEST:  # NaN, inf, the year 10000
        raise InvalidRequest(f"bad since {text[:80]!r}: not a time before the year 10000",
                             hint=HINT)
    return max(0.0, value)


def _parse(text: str, now: float | None) -> float:
    raw = text.strip()
    now = time.time() if now is None else now
    m = _DURATION.match(raw)
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2).lower()]
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"bad since {text!r}: not a duration, time or number",
                             hint=HINT) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def iso(ts: float) -> str:
    """``ts`` as an ISO 8601 UTC time with milliseconds (for ``?since=`` and for display)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
