"""``corral export``: today's fleet as a fleet file, and the small TOML writer it uses.

The stdlib reads TOML but does not write it; a fleet file needs only strings, numbers,
booleans, arrays and inline tables under ``[[instance]]``, so this writes those and nothing
else (a test reads every output back with ``tomllib``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from corral.api.models import InstanceView, StandbyView

HEADER = ("# corral fleet file, written by 'corral export' (apply it with 'corral apply -f').\n"
          "# Not here: env (the API does not show it back) and host pins (where each instance\n"
          "# runs today is the scheduler's or failover's choice; add host = \"...\" to pin).\n")


def toml_str(s: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's; DEL must be escaped too."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v} has no place in a fleet file")
        return repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, Mapping):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{toml_str(str(k))} = {toml_value(x)}" for k, x in v.items()
                                if x is not None) + " }"
    if isinstance(v, Sequence):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dumps(spec: Mapping[str, Any], header: str = "") -> str:
    """``{"instance": [{...}, ...]}`` as TOML: one ``[[instance]]`` table each (None: left
    out)."""
    parts = [header] if header else []
    for entry in spec.get("instance", []):
        lines = ["[[instance]]"]
        for key, value in entry.items():
            if value is not None:
                lines.append(f"{key} = {toml_value(value)}")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def fmt_size(n: int) -> int | str:
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    return n


def export(views: Sequence[InstanceView], standbys: Sequence[StandbyView]) -> dict[str, Any]:
    """Today's fleet as a fleet file's data: applied back, it plans to nothing."""
    sbs = {s.instance: s for s in standbys}
    out: list[dict[str, Any]] = []
    for v in sorted(views, key=lambda v: v.name):
        entry: dict[str, Any] = {"name": v.name, "driver": v.driver, "cpus": v.cpus,
                                 "memory": fmt_size(v.memory_bytes)}
        if v.image is not None:
            entry["image"] = v.image
            entry["entrypoint"] = []  # the command below is the whole argv the image gave
        if v.rootfs is not None:
            entry["rootfs"] = v.rootfs
        entry["command"] = list(v.command)
        if v.vip is not None:
            entry["vip"] = v.vip
        if v.tail:
            entry["tail"] = dict(v.tail)
        if v.restart.mode != "no":
            entry["restart"] = v.restart.model_dump()
        if v.check is not None:
            entry["check"] = v.check.model_dump()
            for key, default in (("failover", False), ("grace", 0.0)):
                if entry["check"][key] == default:  # files stay as they were written
                    del entry["check"][key]
        sb = sbs.get(v.name)
        if sb is not None:
            entry["standby"] = {"host": sb.host, "every": sb.every_seconds}
        out.append(entry)
    return {"instance": out}
