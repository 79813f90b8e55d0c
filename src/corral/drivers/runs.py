"""Pieces the real drivers share: spec checks, the files that outlive an agent, exit decoding.

Two facts must survive an agent restart besides the handle itself, and both live as small files
in the instance's workdir, where a new agent finds them: that a stop was *asked for* (so an
instance that ended then reads ``stopped``, not ``exited``) and how the workload ended when the
driver saw it end. Both are tagged with the generation they belong to, so a stale file from an
earlier run never describes the current one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal as _signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from corral.drivers.base import Handle, Spec
from corral.errors import InvalidRequest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STOP_FILE = "stop-requested"
EXIT_FILE = "exit-status.json"
FROZEN_FILE = "frozen"
#: signals that, sent by the operator, mean "end it" (the instance then reads stopped).
ENDING_SIGNALS = frozenset({_signal.SIGTERM, _signal.SIGKILL, _signal.SIGINT, _signal.SIGQUIT})


def check_spec(spec: Spec, *, needs_rootfs: bool = False) -> None:
    if not NAME_RE.match(spec.name):
        raise InvalidRequest(f"instance name {spec.name!r} is not usable as a process/cgroup name",
                             hint="use letters, digits, '.', '_' or '-', at most 63 characters")
    if not spec.command:
        raise InvalidRequest(f"instance {spec.name}: empty command", hint="give a command to run")
    if not spec.workdir:
        raise InvalidRequest(f"instance {spec.name}: no workdir", hint="the agent must set one")
    if needs_rootfs and not spec.rootfs:
        raise InvalidRequest(f"instance {spec.name}: this driver needs a root filesystem",
                             hint="give one with --from PATH (see corral.agent.busybox)")
    if needs_rootfs and spec.rootfs and not Path(spec.rootfs).is_dir():
        raise InvalidRequest(f"instance {spec.name}: root filesystem {spec.rootfs} is not a "
                             "directory", hint="build one with corral.agent.busybox")


def spec_to_data(spec: Spec) -> dict[str, Any]:
    return asdict(spec)


def spec_from_handle(handle: Handle) -> Spec:
    raw = dict(handle.data["spec"])
    return Spec(
        name=str(raw["name"]),
        command=[str(c) for c in raw["command"]],
        workdir=str(raw["workdir"]),
        rootfs=None if raw.get("rootfs") is None else str(raw["rootfs"]),
        env={str(k): str(v) for k, v in dict(raw.get("env") or {}).items()},
        cpus=float(raw.get("cpus") or 0.0),
        memory_bytes=int(raw.get("memory_bytes") or 0),
        uid=None if raw.get("uid") is None else int(raw["uid"]),
        gid=None if raw.get("gid") is None else int(raw["gid"]),
        additional_gids=tuple(int(g) for g in raw.get("additional_gids") or ()),
        cwd=str(raw.get("cwd") or ""),
        stop_signal=int(raw.get("stop_signal") or 0),
        vip=None if raw.get("vip") is None else str(raw["vip"]),
    )


def workdir(handle: Handle) -> Path:
    return Path(str(handle.data["spec"]["workdir"]))


def base_env(spec: Spec) -> dict[str, str]:
    """A clean environment: the agent's own (with its token) is never passed to a workload."""
    env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    env.update(spec.env)
    return env


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def mark_stop(handle: Handle) -> None:
    """Remember (on disk) that the current generation was stopped on request."""
    gen = handle.data.get("generation")
    if gen:
        _write_atomic(workdir(handle) / STOP_FILE, str(gen))


def stop_requested(handle: Handle) -> bool:
    gen = handle.data.get("generation")
    try:
        return bool(gen) and (workdir(handle) / STOP_FILE).read_text().strip() == gen
    except OSError:
        return False


def mark_frozen(handle: Handle, frozen: bool) -> None:
    """Remember that the driver froze the current generation (for freezes made of signals,
    whose leader may sit in D state, not T, while its vfork child is stopped)."""
    gen = handle.data.get("generation")
    path = workdir(handle) / FROZEN_FILE
    if frozen and gen:
        _write_atomic(path, str(gen))
    elif not frozen:
        path.unlink(missing_ok=True)


def frozen_marked(handle: Handle) -> bool:
    gen = handle.data.get("generation")
    try:
        return bool(gen) and (workdir(handle) / FROZEN_FILE).read_text().strip() == gen
    except OSError:
        return False


def record_exit(handle: Handle, exit_code: int | None, signal: int | None) -> None:
    gen = handle.data.get("generation")
    if not gen:
        return
    data = {"generation": gen, "exit_code": exit_code, "signal": signal}
    # a workdir that went away (deleted instance) loses only this file: memory still knows
    with contextlib.suppress(OSError):
        _write_atomic(workdir(handle) / EXIT_FILE, json.dumps(data))


def read_exit(handle: Handle, path: Path | None = None) -> tuple[int | None, int | None] | None:
    """(exit_code, signal) recorded for the handle's generation, or None."""
    try:
        raw = json.loads((path or workdir(handle) / EXIT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if raw.get("generation") != handle.data.get("generation"):
        return None
    code, sig = raw.get("exit_code"), raw.get("signal")
    return (None if code is None else int(code), None if sig is None else int(sig))


def clear_run_files(wd: Path) -> None:
    for name in (STOP_FILE, EXIT_FILE, FROZEN_FILE):
        with contextlib.suppress(FileNotFoundError):
            (wd / name).unlink()


def decode_returncode(rc: int) -> tuple[int | None, int | None]:
    """Popen's returncode (negative = killed by that signal) as (exit_code, signal)."""
    return (None, -rc) if rc < 0 else (rc, None)


def decode_wait_status(status: int) -> tuple[int | None, int | None]:
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` seconds pass; returns whether it held."""
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())) or interval)
        interval = min(interval * 1.5, 0.1)


KILL_WAIT = 10.0


def stop_then_kill(
    handle: Handle,
    frozen: bool,
    timeout: float,
    *,
    signal: Callable[[int], None],
    kill_all: Callable[[], None],
    gone: Callable[[float], bool],
    thaw: Callable[[], None],
    what: str,
) -> None:
    """The stop every driver does: mark it requested, SIGTERM (a frozen instance is thawed so
    it can act on it), wait ``timeout``, then SIGKILL everything and wait a bounded time more."""
    mark_stop(handle)
    signal(_signal.SIGTERM)
    if frozen:
        thaw()
    if not gone(timeout):
        kill_all()
        if not gone(KILL_WAIT):
            from corral.errors import DriverError

            raise DriverError(f"{what} {handle.name} survived SIGKILL for {KILL_WAIT:.0f} s",
                              hint="a process stuck in the kernel (D state)?", retryable=True)


def signal_instance(handle: Handle, signum: int, frozen: bool, *,
                    send: Callable[[int], None], thaw: Callable[[], None]) -> None:
    """``kill``: an ending signal counts as a requested stop, and reaches a frozen instance."""
    if signum in ENDING_SIGNALS:
        mark_stop(handle)
    send(signum)
    if frozen and signum in ENDING_SIGNALS:
        thaw()

