"""``corral systemd print UNIT``: the units shipped in the package (:mod:`corral.systemd`)."""

from __future__ import annotations

import sys

from corral import systemd
from corral.cli.app import UsageError

USAGE = "usage: corral systemd print [--bin PATH] [UNIT]\n"


def print_unit(unit: list[str], corral_bin: str | None) -> None:
    if not unit:
        print("\n".join(systemd.UNITS))
        return
    if len(unit) > 1:
        raise UsageError("one unit at a time", USAGE, "corral systemd print")
    try:
        text = systemd.unit_text(unit[0], corral_bin)
    except KeyError:
        error = UsageError(f"corral ships no unit {unit[0]!r}", USAGE, "corral systemd print")
        error.hint = "units: " + ", ".join(systemd.UNITS)
        raise error from None
    sys.stdout.write(text)
