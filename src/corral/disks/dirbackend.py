"""``dir`` disk backend: an instance's root is a plain directory; transfers are rsync passes.

A refresh (standby or migration) is two passes: a live pass of the whole tree while the instance
runs, then, frozen, a pass of only the paths the inotify tracker saw change since the live pass
began. The tracker's list is taken *before* the live pass starts, so a file changed while the
live pass was reading it is in the frozen list and its final version is what lands. When the
tracker cannot vouch for its list (overflow, renamed directory), the frozen pass is a full pass:
slower, never wrong.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from corral.disks.dirty import DirtyTracker
from corral.disks.rsync import Endpoint, PassResult, PreparedPass, TransferFailed, run_pass
from corral.errors import InvalidRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refresh:
    live: PassResult
    frozen: PassResult
    frozen_full: bool  # the frozen pass had to scan everything
    freeze_s: float  # from freeze() returning to thaw() being called

    @property
    def bytes_sent(self) -> int:
        return self.live.bytes_sent + self.frozen.bytes_sent


class DirBackend:
    name = "dir"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._trackers: dict[str, DirtyTracker] = {}
        self.last_timing: dict[str, float] = {}

    def available(self) -> str | None:
        return None if shutil.which("rsync") else "rsync not found; apt-get install rsync"

    def path(self, name: str) -> Path:
        return self.root / name

    def create(self, name: str) -> Path:
        p = self.path(name)
        if p.exists():
            raise InvalidRequest(f"disk {p} exists", hint="remove it first")
        p.mkdir(parents=True)
        return p

    def delete(self, name: str) -> None:
        self.untrack(name)
        shutil.rmtree(self.path(name), ignore_errors=True)

    def track(self, name: str) -> DirtyTracker:
        """Start (or keep) watching the instance's tree; call when it starts running."""
        tr = self._trackers.get(name)
        if tr is None:
            tr = self._trackers[name] = DirtyTracker(self.path(name))
            tr.start()
        return tr

    def untrack(self, name: str) -> None:
        tr = self._trackers.pop(name, None)
        if tr is not None:
            tr.stop()

    async def refresh(self, name: str, ep: Endpoint, freeze: Callable[[], Awaitable[None]],
                      thaw: Callable[[], Awaitable[None]]) -> Refresh:
        """Live pass, freeze, dirty-only pass, thaw. ``thaw`` runs whatever happens."""
        import time

        src = self.path(name)
        tracker = self.track(name)
        tracker.take()  # what changes from now on goes in the frozen pass
        live = await run_pass(src, ep)
        prepared: PreparedPass | None
        try:
            prepared = await PreparedPass.start(src, ep)
        except TransferFailed as exc:  # correctness does not need it, only a short freeze does
            log.warning("refresh of %s: could not prepare the frozen pass (%s); it will "
                        "connect while frozen", name, exc)
            prepared = None
        frozen_at = time.monotonic()
        try:
            await freeze()
            frozen_at = time.monotonic()
            dirty = tracker.take()
            took = time.monotonic()
            if dirty.overflowed:
                if prepared is not None:
                    await prepared.abort()
                frozen = await run_pass(src, ep)
            elif prepared is None:
                frozen = await run_pass(src, ep, dirty.paths)
            else:
                frozen = await prepared.finish(dirty.paths)
        except BaseException:
            if prepared is not None:
                await prepared.abort()
            raise
        finally:
            freeze_s = time.monotonic() - frozen_at
            await thaw()
        self.last_timing = {"take_s": took - frozen_at, "pass_s": frozen.seconds}
        return Refresh(live, frozen, dirty.overflowed, freeze_s)
