"""The OCI runtime config (``config.json``) corral writes for a runc container.

Written from a plain dict rather than ``runc spec`` + edits, so every choice is visible here:
user/pid/ipc/uts/mount namespaces but *not* network (the container shares its agent's network
namespace, which under ``corral up --netns`` is that host's namespace, so the instance answers on
the host's address), cgroup limits from the reservation, and the cgroup at
``/corral/<scope>/<name>`` where the driver reads its counters without asking runc.

The user namespace (ids in :mod:`corral.drivers.runc_userns`) is what keeps a container's root
from being the host's: without it a workload could leave a setuid-root binary in its disk for
any host user to run. Two consequences shape the rest: ``/sys`` is bound from the host
(read-only) because the kernel lets only the owner of a network namespace mount a sysfs, and
the container's user namespace does not own the host's; and a port below 1024 needs the host's
``net.ipv4.ip_unprivileged_port_start`` (CAP_NET_BIND_SERVICE inside a user namespace does not
reach the host's network namespace).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from corral.drivers.base import Spec
from corral.drivers.runc_userns import id_mappings
from corral.drivers.runs import DEFAULT_PATH

CPU_PERIOD_US = 100_000
#: Docker's default set, less NET_RAW: the container shares the host's network namespace. In the
#: container's user namespace they act only on its own ids' files and processes (CHOWN, FOWNER,
#: FSETID, SETFCAP, SETUID...), and MKNOD makes no device node at all.
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
        {"destination": "/sys", "type": "bind", "source": "/sys",
         "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]},
    ]


def process_user(spec: Spec) -> dict[str, Any]:
    """The container's ids the process runs as (an image's User; root without one): ids of
    the container's user namespace, so a uid 1000 is the host's ``HOST_BASE + 1000``."""
    user: dict[str, Any] = {"uid": spec.uid or 0, "gid": spec.gid or 0}
    if spec.additional_gids:
        user["additionalGids"] = list(spec.additional_gids)
    return user


def stop_signal(spec: Spec) -> int:
    """The signal a stop sends first: the image's StopSignal, else SIGTERM. (runc's config has
    no place for it: the driver sends it.)"""
    return spec.stop_signal or int(signal.SIGTERM)


def build_config(spec: Spec, scope: str, root_path: str | None = None) -> dict[str, Any]:
    """The OCI config for ``spec``; ``spec.rootfs`` must be set (checked by the driver).
    ``root_path``: where runc finds that root (the driver's private mount of it), if not at
    ``spec.rootfs`` itself."""
    env = {"PATH": DEFAULT_PATH, "TERM": "xterm", "HOME": "/root"}
    env.update(spec.env)
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if spec.cpus > 0:
        resources["cpu"] = {"quota": max(1000, int(spec.cpus * CPU_PERIOD_US)),
                            "period": CPU_PERIOD_US}
    if spec.memory_bytes > 0:
        resources["memory"] = {"limit": spec.memory_bytes}
    rootfs = str(Path(spec.rootfs or "").absolute())
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": process_user(spec),
            "args": list(spec.command),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": spec.cwd or "/",
            "capabilities": {k: list(CAPABILITIES)
                             for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": root_path or rootfs, "readonly": False},
        "annotations": {"org.corral.rootfs": rootfs},
        "hostname": spec.name,
        "mounts": _mounts(),
        "linux": {
            "namespaces": [{"type": t} for t in ("user", "pid", "ipc", "uts", "mount")],
            "uidMappings": id_mappings(),
            "gidMappings": id_mappings(),
            "resources": resources,
            "cgroupsPath": cgroups_path(scope, spec.name),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def write_bundle(bundle: Path, spec: Spec, scope: str, root_path: str | None = None) -> Path:
    """Write ``bundle/config.json`` (atomically) and return its path."""
    bundle.mkdir(parents=True, exist_ok=True)
    path = bundle / "config.json"
    tmp = bundle / f".config.json.{os.getpid()}"
    tmp.write_text(json.dumps(build_config(spec, scope, root_path), indent=2))
    os.replace(tmp, path)
    return path
