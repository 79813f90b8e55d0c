"""Turning command-line text into values, with errors that say what was wrong and what works.

Units: ``K M G T`` (also ``Ki Mi Gi Ti``, ``KiB`` ...) are powers of 1024, as in ``docker
--memory``; ``KB MB GB TB`` are powers of 1000; a bare number is bytes.
"""

from __future__ import annotations

import re
import signal

from corral.errors import InvalidRequest

_UNITS: dict[str, int] = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS[_p] = _UNITS[_p + "i"] = _UNITS[_p + "ib"] = 1024**_i
    _UNITS[_p + "b"] = 1000**_i

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")
SIZE_HINT = "use a number with an optional unit: 512K, 64M, 1.5G, 512Ki, 1Gi, 100MB (or bytes)"


def parse_memory(text: str) -> int:
    """Bytes in ``text`` ("64M", "1G", "512Ki", "1000000")."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidRequest(f"bad memory size {text!r}: not a number with a unit", hint=SIZE_HINT)
    number, unit = m.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise InvalidRequest(f"bad memory size {text!r}: unknown unit {unit!r}", hint=SIZE_HINT)
    value = int(float(number) * factor)
    if value <= 0:
        raise InvalidRequest(f"bad memory size {text!r}: must be more than 0 bytes",
                             hint=SIZE_HINT)
    return value


def parse_env(items: list[str]) -> dict[str, str]:
    """``K=V`` pairs; the value may hold '=' and be empty, the key may not."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise InvalidRequest(
                f"bad --env {item!r}: expected KEY=VALUE",
                hint="keys are letters, digits and '_' not starting with a digit, e.g. "
                "--env MODE=fast",
            )
        out[key] = value
    return out


def parse_tail(items: list[str]) -> dict[str, str]:
    """``SOURCE=PATH`` pairs for ``--tail`` (the wire model checks names and paths)."""
    out: dict[str, str] = {}
    for item in items:
        source, sep, path = item.partition("=")
        if not sep or not source or not path:
            raise InvalidRequest(f"bad --tail {item!r}: expected SOURCE=PATH",
                                 hint="e.g. --tail access=/var/log/access.log")
        if source in out:
            raise InvalidRequest(f"--tail names source {source!r} twice",
                                 hint="give each source one path")
        out[source] = path
    return out


def parse_signal(text: str) -> int:
    """A signal by number ("9") or name ("KILL", "SIGKILL", "sigterm")."""
    raw = text.strip().upper()
    if raw.isdigit():
        num = int(raw)
        if 1 <= num <= 64:
            return num
    else:
        name = raw if raw.startswith("SIG") else "SIG" + raw
        try:
            return int(signal.Signals[name])
        except KeyError:
            pass
    raise InvalidRequest(f"bad signal {text!r}",
                         hint="give a number 1-64 or a name such as TERM, KILL, HUP, INT, USR1")


def parse_cpus(value: float) -> float:
    if value <= 0:
        raise InvalidRequest(f"bad --cpus {value}: must be more than 0",
                             hint="a CPU reservation in cores, e.g. 0.5 or 2")
    return value


_TIME_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``5m``, ``1h`` or ``2d``."""
    raw = text.strip().lower()
    try:
        unit = raw[-1] if raw and raw[-1] in _TIME_UNITS else ""
        value = float(raw[:-1]) * _TIME_UNITS[unit] if unit else float(raw)
    except ValueError:
        raise InvalidRequest(f"{text!r} is not a duration",
                             hint="write it like 30s, 5m or 1h") from None
    if value < 0:
        raise InvalidRequest(f"{text!r} is negative", hint="give a duration of 0 or more")
    return value
