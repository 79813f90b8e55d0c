"""The OCI runtime config (``config.json``) corral writes for a runc container.

Written from a plain dict rather than ``runc spec`` + edits, so every choice is visible here:
pid/ipc/uts/mount namespaces but *not* network (the container shares its agent's network
namespace, which under ``corral up --netns`` is that host's namespace, so the instance answers on
the host's address), cgroup limits from the reservation, and the cgroup at
``/corral/<scope>/<name>`` where the driver reads its counters without asking runc.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from corral.drivers.base import Spec
from corral.drivers.runs import DEFAULT_PATH

CPU_PERIOD_US = 100_000
#: Docker's default set, less NET_RAW: the container shares the host's network namespace.
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
    "CAP_KILL", "CAP_AUDIT_WRITE",
]
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/proc/scsi",
]
READONLY_PATHS = [
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
]


def cgroups_path(scope: str, name: str) -> str:
    return f"/corral/{scope}/{name}"


def _mounts() -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]


def build_config(spec: Spec, scope: str) -> dict[str, Any]:
    """The OCI config for ``spec``; ``spec.rootfs`` must be set (checked by the driver)."""
    env = {"PATH": DEFAULT_PATH, "TERM": "xterm", "HOME": "/root"}
    env.update(spec.env)
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if spec.cpus > 0:
        resources["cpu"] = {"quota": max(1000, int(spec.cpus * CPU_PERIOD_US)),
                            "period": CPU_PERIOD_US}
    if spec.memory_bytes > 0:
        resources["memory"] = {"limit": spec.memory_bytes}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(spec.command),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": "/",
            "capabilities": {k: list(CAPABILITIES)
                             for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(Path(spec.rootfs or "").absolute()), "readonly": False},
        "hostname": spec.name,
        "mounts": _mounts(),
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "resources": resources,
            "cgroupsPath": cgroups_path(scope, spec.name),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def write_bundle(bundle: Path, spec: Spec, scope: str) -> Path:
    """Write ``bundle/config.json`` (atomically) and return its path."""
    bundle.mkdir(parents=True, exist_ok=True)
    path = bundle / "config.json"
    tmp = bundle / f".config.json.{os.getpid()}"
    tmp.write_text(json.dumps(build_config(spec, scope), indent=2))
    os.replace(tmp, path)
    return path
