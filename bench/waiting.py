"""The one bounded wait the benches share: a bench that cannot get where it waits for stops
with what it waited for, rather than hanging or reporting a figure of a broken run."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait(pred: Callable[[], Any], what: str, timeout: float, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(every)
