"""The per-container shim: runs ``runc create`` and stays to collect the container's exit status.

``runc create`` exits as soon as the container exists, which orphans the container's init: its
exit status would go to PID 1 and be lost. This shim marks itself a *child subreaper*, so the
orphaned init is re-parented to it; it then waits for the init and writes how it ended to a file
in the instance's workdir, where the driver (or a restarted agent) reads it. The shim lives in its
own session, so an agent killed with -9 takes no container with it (containerd's shim, conmon).

``runc create`` itself runs in a mount namespace of its own, where the container's root
filesystem is bound at ``root_mount`` (the path ``config.json`` names). The container's root
(host id ``HOST_BASE`` in its user namespace) must be able to walk the path to its root, and a
disk's path often cannot be walked by others (a 0700 data directory, pytest's
``/tmp/pytest-of-root``); the bind is reachable by anyone. That namespace is the create's only:
nothing is mounted on the host, so nothing is left mounted if anything dies, and the
container's own mount namespace (a copy taken by runc) keeps its root when the create exits.

Standard library only, started as ``python -I -S runc_shim.py CONFIG_JSON``; it tells the driver
on stdout either ``created <pid>`` or ``failed <rc>``, then closes stdout.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from typing import Any

PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000


def _set_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _log_error(log: str | None, msg: str) -> None:
    """A line in runc's own log format, where the driver looks for why a create failed."""
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"level": "error", "msg": msg}) + "\n")


def _bind_root(rootfs: str, root_mount: str, log: str | None) -> None:
    """In the child about to exec ``runc create``: a mount namespace of its own, nothing in it
    propagating back to the host's, and the root filesystem bound at ``root_mount``."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            # written here: subprocess reports only "Exception occurred in preexec_fn"
            _log_error(log, f"corral shim: {what}: {os.strerror(err)}")
            raise OSError(err, f"{what}: {os.strerror(err)}")

    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    check(libc.mount(rootfs.encode(), root_mount.encode(), None, MS_BIND | MS_REC, None),
          f"bind {rootfs} at {root_mount}")


def _write_exit(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _decode(status: int) -> tuple[int | None, int | None]:
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None


def _wait_gone(pid: int) -> None:
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                    return
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    reaper = _set_subreaper()
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(cfg["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    err = os.open(cfg["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        rc = subprocess.call(cfg["create"], stdin=null, stdout=out, stderr=err, cwd=cfg["bundle"],
                             preexec_fn=lambda: _bind_root(cfg["rootfs"], cfg["root_mount"],
                                                           cfg.get("log")))
    except subprocess.SubprocessError:  # the child logged why (_bind_root)
        rc = 125
    except OSError as e:
        _log_error(cfg.get("log"), f"corral shim: {e}")
        rc = 125
    os.close(out)
    os.close(err)
    if rc != 0:
        print(f"failed {rc}", flush=True)
        return 1
    with open(cfg["pid_file"]) as f:
        pid = int(f.read().strip())
    print(f"created {pid}", flush=True)
    os.dup2(null, 1)
    os.dup2(null, 2)
    result: dict[str, Any] = {"pid": pid, "exit_code": None, "signal": None,
                              "subreaper": reaper}
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:  # init was not re-parented to us: its status is lost
            _wait_gone(pid)
            break
        except InterruptedError:
            continue
        if done == pid:
            result["exit_code"], result["signal"] = _decode(status)
            break
    # tied to the run by pid; the driver removes the file before each start
    _write_exit(cfg["exit_file"], result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
