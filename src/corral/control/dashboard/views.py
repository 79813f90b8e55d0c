"""Formatting for the templates: the same units and words as the CLI's tables."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any


def size(n: Any) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def pct(x: Any) -> str:
    return "-" if x is None else f"{float(x):.1f}%"


def ago(ts: Any) -> str:
    if ts is None:
        return "-"
    s = max(0.0, time.time() - float(ts))
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    if s < 172800:
        return f"{s / 3600:.1f}h ago"
    return f"{s / 86400:.0f}d ago"


def clock(ts: Any) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")


def secs(x: Any) -> str:
    if x is None:
        return "-"
    v = float(x)
    return f"{v:.1f}s" if v < 120 else f"{v / 60:.1f}m"


def width(part: Any, whole: Any) -> float:
    """A bar's width in % (0..100) for ``part`` of ``whole``."""
    if part is None or not whole:
        return 0.0
    return max(0.0, min(100.0, 100.0 * float(part) / float(whole)))


def progress(op: dict[str, Any]) -> float:
    steps = op.get("steps") or []
    done = sum(1 for s in steps if s.get("state") == "done")
    return 100.0 * done / len(steps) if steps else 0.0


def facts(result: dict[str, Any] | None) -> list[str]:
    """An operation's result as ``key=value`` words: sizes in bytes, times as ages, floats
    short; lists and mappings left to the API (the group results)."""
    out = []
    for k, v in (result or {}).items():
        if v is None or isinstance(v, list | dict):
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            out.append(f"{k}={v}")
        elif k == "bytes" or k.endswith(("_bytes", "size")):
            out.append(f"{k}={size(v)}")
        elif k.endswith("_at"):
            out.append(f"{k.removesuffix('_at')} {ago(v)}")
        elif k.endswith("_ms"):
            out.append(f"{k}={float(v):.1f}")
        else:
            out.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return out


def kv(data: dict[str, Any] | None) -> str:
    """An event's data as ``key=value`` words (empty values left out), as ``corral events``
    prints them."""
    words = []
    for k, v in (data or {}).items():
        if v is None or v == "" or v == [] or v == {}:
            continue
        words.append(f"{k}={v if isinstance(v, str | int | float) else json.dumps(v)}")
    return " ".join(words)


FILTERS: dict[str, Callable[..., Any]] = {
    "size": size, "pct": pct, "ago": ago, "clock": clock, "secs": secs, "width": width,
    "progress": progress, "facts": facts, "kv": kv,
}
