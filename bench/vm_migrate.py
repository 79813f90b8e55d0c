#!/usr/bin/env python3
"""Figure: a VM's live migration through corral, beside QEMU's own migrate driven by QMP.

The same guest (``python -m corral.drivers.qemu_guest``), the same memory (256 MiB; ``--long``:
512 MiB, the issue's size), the same disk (the guest's 32 MiB data disk, sent by block
migration in both), one vCPU, the same QEMU and accelerator on the same machine, and **TLS in
both**: corral's stream goes through the agents' data channel (mutual TLS with the hosts'
certificates, the server's ticket), the baseline's is QEMU's own (x509 credentials from a CA
of the fleet's kind; the destination admits only the source's certificate).

The guest's command is a writer dirtying memory at a fixed rate: it
copies 1 MiB of random bytes into a 64 MiB file of its RAM-backed root (``/tmp``, an
initramfs) every 0.1 s (about 10 MiB/s at most; the rate reached is printed), counting the
copies in its shell's memory and printing every tenth count on its console.

* **corral**: a ``corral up --hosts 2 --netns`` fleet whose agents offer qemu; the VM runs on
  host1 and each round is ``corral migrate vm --to <the other host> --json`` (the product's
  whole path: plan, the disk directory's file pass, create, ``-incoming``, the stream, the
  switch-over, ending the source). Total = the command's wall time; also the operation's own
  span (server clock) and QEMU's downtime and bytes from the result. The VM has a virtual IP
  and a client in the root namespace holds a TCP connection to the guest's counting stream
  (a number every 0.1 s) open through every round: the longest wait between two numbers is
  what a client of the service felt of the move (QEMU's downtime, the hand-over of the address,
  TCP's retransmission), and the numbers must never skip or repeat.
* **baseline (raw QEMU)**: two QEMUs on this machine with the same argv (started by corral's
  qemu driver code, which only builds the command line), the destination with ``-incoming
  defer``; this script copies the guest's directory (kernel, initrd, disk) to the destination
  and drives the source by QMP itself (``object-add tls-creds-x509``,
  ``migrate-set-capabilities block``, ``migrate-set-parameters downtime-limit 300``,
  ``migrate``, ``query-migrate`` every 50 ms). Total = from the copy's start to
  ``completed``. Its stream runs over loopback, corral's over the fleet's veth pair.

* **corral, runc (warm)**: then, on the same fleet, the same writer in a runc container with
  the same memory limit, moved by corral's freeze-and-restart migration (a live file pass, the
  container frozen for a pass of what changed, started again on the target): its root is the
  instance's disk, so the 64 MiB file is on disk and the count is kept in a file (the only
  state a restart carries over). ``--no-runc`` leaves it out.

Every round checks the result: the counter goes on from where it was (never back to 1, no
second boot on the console) and one QEMU of the VM (one copy of the container) is left.

    .venv/bin/python bench/vm_migrate.py            # 3 rounds of each, 256 MiB
    .venv/bin/python bench/vm_migrate.py --long     # 512 MiB
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import waiting

CLI = [sys.executable, "-m", "corral.cli"]
MiB = 1024 * 1024
#: one copy of 1 MiB every 0.1 s over a 64 MiB working set; every tenth count printed
WRITER = ("head -c 1048576 /dev/urandom > /tmp/src; i=0; while :; do i=$((i + 1)); "
          "dd if=/tmp/src of=/tmp/buf bs=1048576 count=1 seek=$((i % 64)) conv=notrunc "
          "2>/dev/null; if [ $((i % 10)) = 0 ]; then "
          "echo \"tick $i $(cut -d' ' -f1 /proc/uptime)\"; fi; sleep 0.1; done")
#: the same writer in a runc container: its root is the instance's disk, so the 64 MiB file is
#: on disk, and the count is kept there too (renamed into place, never half-written), the only
#: state a freeze-and-restart carries over
CWRITER = ("i=$(cat /count 2>/dev/null || echo 0); [ -f /src ] || "
           "head -c 1048576 /dev/urandom > /src; while :; do i=$((i + 1)); "
           "dd if=/src of=/buf bs=1048576 count=1 seek=$((i % 64)) conv=notrunc 2>/dev/null; "
           "echo $i > /count.new && mv /count.new /count; if [ $((i % 10)) = 0 ]; then "
           "echo \"tick $i $(cut -d' ' -f1 /proc/uptime)\"; fi; sleep 0.1; done # {marker}")
TICK = re.compile(r"^(?:\S+\s+)*?tick (\d+) ([\d.]+)\s*$", re.M)
DOWNTIME_MS = 300
BOOT = 240.0


def ticks(text: str) -> list[tuple[int, float]]:
    return [(int(n), float(up)) for n, up in TICK.findall(text)]


def wait(pred: Callable[[], Any], what: str, timeout: float, every: float = 0.2) -> Any:
    return waiting.wait(pred, what, timeout, every)


def continuous(text: str, before: int) -> list[int]:
    """The counts on a console across migrations: rising, from 1, one boot, past ``before``."""
    nums = [n for n, _ in ticks(text)]
    if not nums or nums[0] != 10 or any(b <= a for a, b in itertools.pairwise(nums)):
        raise SystemExit(f"the guest's counter restarted or went back: {nums[-20:]}")
    if text.count("Linux version") > 1:
        raise SystemExit("the guest booted again")
    if nums[-1] <= before:
        raise SystemExit(f"the counter did not go on past {before}: {nums[-5:]}")
    return nums


def rate(text: str) -> float:
    """MiB per second the writer reached (one MiB a count), over the console's span."""
    got = ticks(text)
    if len(got) < 2 or got[-1][1] <= got[0][1]:
        return 0.0
    return (got[-1][0] - got[0][0]) / (got[-1][1] - got[0][1])


def qemus(marker: str, name: str) -> list[int]:
    """QEMU processes (not shims) whose command line holds ``marker`` and ``name``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (d / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"qemu-system-x86_64") and any(
                    marker.encode() in a for a in argv) and any(name.encode() in a for a in argv):
                out.append(int(d.name))
    return out


def kill_all(marker: str) -> None:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (d / "cmdline").read_bytes()
            if marker.encode() in cmd and (b"qemu-system" in cmd or b"corral-qemu" in cmd):
                os.kill(int(d.name), signal.SIGKILL)


def copies(marker: str) -> list[int]:
    """Pids of the container's shell (its argv carries the marker), zombies left out, its own
    forks (``$(...)`` subshells carry the same argv for a moment) counted as the shell."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker.encode() not in (d / "cmdline").read_bytes():
                continue
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(d.name)] = int(fields[1])
        except OSError:
            continue
    return sorted(pid for pid, ppid in parents.items() if ppid not in parents)


def summary(xs: list[float], unit: str, fmt: str = ".2f") -> str:
    return (f"median {statistics.median(xs):{fmt}} {unit} "
            f"(min {min(xs):{fmt}}, max {max(xs):{fmt}})")


# -- corral ----------------------------------------------------------------------------------
class Fleet:
    def __init__(self, top: Path) -> None:
        self.top = top
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        self.env["CORRAL_CONTEXT"] = str(top / "context.json")
        self.cli("up", "--hosts", "2", "--netns", "--data", str(top / "data"), timeout=420)

    def cli(self, *args: str, timeout: float = 180) -> str:
        p = subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode != 0:
            raise SystemExit(f"corral {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def offer_qemu(self, name: str) -> None:
        """Start ``name``'s agent again with qemu among its drivers (``corral up`` offers
        process and runc) and wait until the server lists it."""
        from corral.rig import procs
        from corral.rig.context import load_context, save_context

        path = Path(self.env["CORRAL_CONTEXT"])
        ctx = load_context(path)
        assert ctx is not None
        old = next(a for a in ctx.agents if a.name == name)
        argv = list(old.argv)
        i = argv.index("--drivers") + 1
        argv[i] = f"{argv[i]},qemu"
        os.kill(old.pid, signal.SIGTERM)
        if not wait(lambda: not procs.alive(old), f"{name}'s agent to stop", 15, 0.1):
            os.kill(old.pid, signal.SIGKILL)
        log = Path(old.log)
        start = log.stat().st_size if log.exists() else 0
        new = procs.spawn(old.name, argv, log, env={**self.env, "CORRAL_TOKEN": ctx.token},
                          netns=old.netns, address=old.address)
        ctx.agents = [dataclasses.replace(new, argv=argv) if a.name == name else a
                      for a in ctx.agents]
        save_context(ctx, path)

        def joined() -> bool:
            with log.open("rb") as fh:
                fh.seek(start)
                return b"joined as " in fh.read()
        wait(joined, f"{name}'s agent joining", 60, 0.1)

        def offered() -> bool:
            hosts = json.loads(self.cli("host", "ls", "--json"))
            h = next(x for x in hosts if x["name"] == name)
            return h["state"] == "up" and bool(
                (h.get("drivers") or {}).get("qemu", {}).get("can_live_migrate"))
        wait(offered, f"{name} offering qemu", 60, 0.5)

    def down(self) -> None:
        subprocess.run([*CLI, "down", "--timeout", "5"], env=self.env, capture_output=True,
                       timeout=180)


def run_runc(fleet: Fleet, memory: int, rounds: int) -> list[dict[str, float]]:
    """corral's warm migration (live file pass, freeze, pass of what changed, start on the
    target) of the same writer in a runc container."""
    hosts = json.loads(fleet.cli("host", "ls", "--json"))
    if not all("runc" in (h.get("drivers") or {}) for h in hosts):
        print("  skipped: the hosts do not offer runc", flush=True)
        return []
    marker = f"vmmig-{os.getpid()}"
    fleet.cli("run", "ct", "--driver", "runc", "--host", "host1", "--cpus", "1", "--memory",
              f"{memory // MiB}M", "--", "sh", "-c", CWRITER.format(marker=marker))
    out: list[dict[str, float]] = []
    try:
        wait(lambda: len(ticks(fleet.cli("logs", "ct"))) >= 3, "the writer writing", 120, 1.0)
        here = "host1"
        for i in range(rounds):
            to = "host2" if here == "host1" else "host1"
            before = ticks(fleet.cli("logs", "ct"))[-1][0]
            t0 = time.monotonic()
            op = json.loads(fleet.cli("migrate", "ct", "--to", to, "--json", timeout=1800))
            wall = time.monotonic() - t0
            if op["state"] != "succeeded":
                raise SystemExit(f"runc round {i + 1}: the migration {op['state']}: "
                                 f"{op.get('error')}")
            res = op["result"] or {}

            def went_on(b: int = before) -> bool:
                got = ticks(fleet.cli("logs", "ct"))
                return bool(got) and got[-1][0] > b + 10
            wait(went_on, "the counter going on", 120, 1.0)
            nums = continuous(fleet.cli("logs", "ct"), before)
            left = copies(marker)
            if len(left) != 1:
                raise SystemExit(f"runc round {i + 1}: {len(left)} copies: {left}")
            row = {"wall_s": wall, "op_s": float(op["updated_at"]) - float(op["created_at"]),
                   "downtime_ms": float(res.get("downtime_ms") or 0),
                   "bytes_mib": float(res.get("bytes") or 0) / MiB}
            out.append(row)
            print(f"  runc round {i + 1} {here}->{to}: total {wall:.2f} s (op {row['op_s']:.2f}"
                  f" s), downtime {row['downtime_ms']:.0f} ms (frozen, then started again), "
                  f"{row['bytes_mib']:.0f} MiB moved; counter {before} -> {nums[-1]}",
                  flush=True)
            here = to
    finally:
        with contextlib.suppress(SystemExit):
            fleet.cli("rm", "--force", "ct", timeout=120)
    return out


def run_corral(top: Path, guest: Path, memory: int, rounds: int,
               runc: bool) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    fleet = Fleet(top)
    out: list[dict[str, float]] = []
    ct: list[dict[str, float]] = []
    try:
        fleet.offer_qemu("host1")
        fleet.offer_qemu("host2")
        from corral.drivers.qemu_guest import CountStream
        from corral.rig.context import load_context

        ctx = load_context(Path(fleet.env["CORRAL_CONTEXT"]))
        assert ctx is not None and ctx.network is not None
        vip = f"10.213.{ctx.network['subnet']}.70"
        fleet.cli("image", "import", "vmguest", str(guest), timeout=300)
        fleet.cli("run", "vm", "--driver", "qemu", "--image", "vmguest", "--host", "host1",
                  "--cpus", "1", "--memory", f"{memory // MiB}M", "--vip", f"{vip}/24", "--",
                  "sh", "-c", "corral-guest-service >/dev/null & " + WRITER)
        wait(lambda: len(ticks(fleet.cli("logs", "vm"))) >= 3, "the writer writing", BOOT, 1.0)
        held = CountStream(wait(lambda: CountStream.connect(vip), f"{vip} answering", BOOT,
                                1.0), read_timeout=300)
        here = "host1"
        for i in range(rounds):
            to = "host2" if here == "host1" else "host1"
            before = ticks(fleet.cli("logs", "vm"))[-1][0]
            mark = len(held.numbers)
            t0 = time.monotonic()
            op = json.loads(fleet.cli("migrate", "vm", "--to", to, "--json", timeout=1800))
            wall = time.monotonic() - t0
            if op["state"] != "succeeded":
                raise SystemExit(f"round {i + 1}: the migration {op['state']}: {op.get('error')}")
            res = op["result"] or {}
            if not res.get("live"):
                raise SystemExit(f"round {i + 1}: the migration was not live: {res}")

            def went_on(b: int = before) -> bool:
                got = ticks(fleet.cli("logs", "vm"))
                return bool(got) and got[-1][0] > b + 10
            wait(went_on, "the counter going on", 120, 1.0)
            def held_on(m: int = mark) -> bool:
                return len(held.numbers) > m + 20 or held.error is not None
            wait(held_on, "the held connection going on", 120, 0.2)
            if why := held.broken():
                raise SystemExit(f"round {i + 1}: {why}")
            pause_ms = held.longest_pause(mark) * 1000
            nums = continuous(fleet.cli("logs", "vm"), before)
            left = qemus(str(top), "vm")
            if len(left) != 1:
                keep = Path(tempfile.mkdtemp(prefix="vm-migrate-failed-"))
                for log in (top / "data").rglob("*.log"):
                    with contextlib.suppress(OSError):
                        shutil.copy(log, keep / "-".join(log.relative_to(top).parts))
                raise SystemExit(f"round {i + 1}: {len(left)} QEMUs of the VM: {left}; "
                                 f"corral ls: {fleet.cli('ls')}; the fleet's logs in {keep}")
            live = (op.get("data") or {}).get("live_stats") or {}
            row = {"wall_s": wall, "op_s": float(op["updated_at"]) - float(op["created_at"]),
                   "downtime_ms": float(res["downtime_ms"]),
                   "stream_s": float(live.get("total_ms") or 0) / 1000,
                   "memory_mib": float(res["memory_bytes"]) / MiB,
                   "disk_mib": float(res["disk_bytes"]) / MiB, "client_pause_ms": pause_ms}
            for step in op.get("steps") or []:
                if step.get("started_at") is not None and step.get("ended_at") is not None:
                    row[f"step:{step['name']}"] = step["ended_at"] - step["started_at"]
            out.append(row)
            print(f"  corral round {i + 1} {here}->{to}: total {wall:.2f} s (op {row['op_s']:.2f}"
                  f" s, QEMU stream {row['stream_s']:.2f} s), downtime {row['downtime_ms']:.0f}"
                  f" ms, memory {row['memory_mib']:.0f} MiB, disk {row['disk_mib']:.0f} MiB;"
                  f" counter {before} -> {nums[-1]}; held connection: longest pause "
                  f"{pause_ms:.0f} ms", flush=True)
            here = to
        held.close()
        print(f"  writer: {rate(fleet.cli('logs', 'vm')):.1f} MiB/s dirtied", flush=True)
        fleet.cli("rm", "--force", "vm", timeout=120)
        if runc:
            print("corral migrate, the same writer in a runc container (warm):", flush=True)
            ct = run_runc(fleet, memory, rounds)
    finally:
        with contextlib.suppress(SystemExit):
            fleet.cli("rm", "--force", "vm", timeout=120)
        fleet.down()
        kill_all(str(top))
    return out, ct


# -- baseline: QEMU's own migrate, driven by QMP -----------------------------------------------
#: RFC 7919's ffdhe2048 group: without a ``dh-params.pem`` a server-side ``tls-creds-x509``
#: makes fresh DH parameters when created (seconds of CPU), as QEMU's docs warn
DH_PARAMS = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""
CREDS_ID, AUTHZ_ID = "bench-tls", "bench-authz"


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    ca_file: str
    cert_file: str
    key_file: str


def identity(ca: Any, d: Path, host: str) -> TlsFiles:
    """A host's key and certificate from ``ca``, as enrolment leaves them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True)
    key = ec.generate_private_key(ec.SECP256R1())
    (d / "host.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
           .sign(key, hashes.SHA256()))
    pem = ca.sign_host(csr.public_bytes(serialization.Encoding.PEM).decode(), host, "127.0.0.1")
    (d / "host.crt").write_bytes(pem)
    return TlsFiles(str(ca.ca_file), str(d / "host.crt"), str(d / "host.key"))


def tls_creds(q: Any, work: Path, tls: TlsFiles, endpoint: str) -> None:
    """QEMU's ``tls-creds-x509`` from a directory of its fixed file names (0700, removed once
    QEMU read it), verifying the peer, as QEMU's migration TLS docs set it up."""
    d = work / "bench-tls"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(mode=0o700)
    try:
        for src, name in ((tls.ca_file, "ca-cert.pem"), (tls.cert_file, f"{endpoint}-cert.pem"),
                          (tls.key_file, f"{endpoint}-key.pem")):
            shutil.copyfile(src, d / name)
        if endpoint == "server":
            (d / "dh-params.pem").write_text(DH_PARAMS)
        q.execute("object-add", {"qom-type": "tls-creds-x509", "id": CREDS_ID, "dir": str(d),
                                 "endpoint": endpoint, "verify-peer": True})
    finally:
        shutil.rmtree(d, ignore_errors=True)


def incoming(drv: Any, h: Any, tls: TlsFiles, peer: str) -> tuple[Any, int]:
    """The destination by hand: QEMU with the VM's argv (the driver's) and ``-incoming
    defer``, TLS credentials, only ``peer``'s certificate admitted, then ``migrate-incoming``
    on a free loopback port."""
    from corral.drivers import qemu_migrate as mig
    from corral.drivers import qemu_qmp, runs
    from corral.drivers.qemu import QMP_SOCK

    d = drv._launch(h, ["-incoming", "defer"])
    with qemu_qmp.QMP(runs.workdir(d) / QMP_SOCK, 60.0) as q:
        tls_creds(q, runs.workdir(d), tls, "server")
        q.execute("object-add", {"qom-type": "authz-simple", "id": AUTHZ_ID,
                                 "identity": f"CN={peer}"})
        q.execute("migrate-set-parameters", {"tls-creds": CREDS_ID, "tls-authz": AUTHZ_ID})
        q.execute("migrate-set-capabilities", mig.capabilities())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        q.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
    return d, port


def qmp_migrate(sock: Path, work: Path, tls: TlsFiles, peer: str, port: int) -> dict[str, Any]:
    """The source's side by hand: credentials, capabilities, parameters, ``migrate``, then
    ``query-migrate`` until it ends; QEMU's last answer."""
    from corral.drivers import qemu_migrate as mig
    from corral.drivers import qemu_qmp

    with qemu_qmp.QMP(sock, 60.0) as q:
        for oid in (CREDS_ID, AUTHZ_ID):  # a QEMU that came in holds the server's
            with contextlib.suppress(qemu_qmp.QMPError):
                q.execute("object-del", {"id": oid})
        tls_creds(q, work, tls, "client")
        q.execute("migrate-set-capabilities", mig.capabilities())
        q.execute("migrate-set-parameters", {
            "downtime-limit": DOWNTIME_MS, "max-bandwidth": mig.MAX_BANDWIDTH,
            "tls-creds": CREDS_ID, "tls-hostname": peer})
        q.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        deadline = time.monotonic() + 1800
        disk: dict[str, Any] = {}
        done_at: float | None = None
        while time.monotonic() < deadline:
            info: dict[str, Any] = q.execute("query-migrate") or {}
            disk = info.get("disk") or disk
            now = time.monotonic()
            if info.get("status") == "completed":  # its figures come a moment later
                done_at = now if done_at is None else done_at
                if mig.settled(info, done_at, now):
                    return {**info, "disk": disk}
            elif info.get("status") in mig.ENDED:
                return {**info, "disk": disk}
            time.sleep(0.05)
    raise SystemExit("the raw QEMU migration did not end in 30 minutes")


def run_baseline(top: Path, guest: Path, memory: int, rounds: int) -> list[dict[str, float]]:
    from corral.control.pki import Authority
    from corral.drivers import runs
    from corral.drivers.base import Handle, Spec
    from corral.drivers.qemu import QMP_SOCK, QemuDriver
    from corral.drivers.qemu_guest import clone_guest
    from corral.drivers.qemu_migrate import parse_stats

    ca = Authority(top / "ca")
    ca.ensure(["server"])
    hosts = {h: identity(ca, top / f"id-{h}", h) for h in ("side1", "side2")}
    drivers = {h: QemuDriver(f"vmb{os.getpid()}{h[-1]}") for h in hosts}
    handles: list[tuple[str, Handle]] = []

    def spec(host: str) -> Spec:
        wd = top / host / "vm"
        return Spec("vm", ["sh", "-c", WRITER], str(wd), rootfs=str(wd / "disk"),
                    env={"CORRAL_VM_FORWARD": ""}, memory_bytes=memory, cpus=1.0)

    def console(h: Handle) -> str:
        return (runs.workdir(h) / "stdout.log").read_text(errors="replace")

    out: list[dict[str, float]] = []
    try:
        clone_guest(guest, top / "side1" / "vm" / "disk")
        h = drivers["side1"].create(spec("side1"))
        handles.append(("side1", h))
        h = drivers["side1"].start(h)
        handles[-1] = ("side1", h)
        wait(lambda: len(ticks(console(h))) >= 3, "the writer writing", BOOT, 1.0)
        here, seen = "side1", ""
        for i in range(rounds):
            to = "side2" if here == "side1" else "side1"
            before = ticks(console(h))[-1][0]
            dst_wd = top / to / "vm"
            shutil.rmtree(dst_wd, ignore_errors=True)
            t0 = time.monotonic()
            shutil.copytree(Path(spec(here).rootfs or ""), dst_wd / "disk")
            d = drivers[to].create(spec(to))
            handles.append((to, d))
            d, port = incoming(drivers[to], d, hosts[to], here)
            handles[-1] = (to, d)
            info = qmp_migrate(runs.workdir(h) / QMP_SOCK, runs.workdir(h), hosts[here], to,
                               port)
            wall = time.monotonic() - t0
            if info.get("status") != "completed":
                raise SystemExit(f"baseline round {i + 1}: {info}")
            st = parse_stats(info, completed=True)
            seen += console(h)
            drivers[here].stop(h, 0.5)  # the paused source, as corral ends it
            drivers[here].delete(h)
            handles.remove((here, h))
            h, here = d, to

            def went_on(b: int = before, now: Handle = h) -> bool:
                got = ticks(console(now))
                return bool(got) and got[-1][0] > b + 10
            wait(went_on, "the counter going on", 120, 1.0)
            nums = continuous(seen + console(h), before)
            left = qemus(str(top), "vm")
            if len(left) != 1:
                raise SystemExit(f"baseline round {i + 1}: {len(left)} QEMUs: {left}")
            row = {"wall_s": wall, "downtime_ms": float(st.downtime_ms or 0),
                   "stream_s": st.total_ms / 1000, "memory_mib": st.ram_bytes / MiB,
                   "disk_mib": st.disk_bytes / MiB}
            out.append(row)
            print(f"  raw QEMU round {i + 1} {here}: total {wall:.2f} s (QEMU stream "
                  f"{row['stream_s']:.2f} s), downtime {row['downtime_ms']:.0f} ms, memory "
                  f"{row['memory_mib']:.0f} MiB, disk {row['disk_mib']:.0f} MiB; counter "
                  f"{before} -> {nums[-1]}", flush=True)
        print(f"  writer: {rate(seen + console(h)):.1f} MiB/s dirtied", flush=True)
    finally:
        for host, hd in handles:
            with contextlib.suppress(Exception):
                drivers[host].stop(hd, 0.5)
            with contextlib.suppress(Exception):
                drivers[host].delete(hd)
        kill_all(str(top))
        for drv in drivers.values():  # the drivers' scopes, empty once their VMs are gone
            root = Path("/sys/fs/cgroup")
            for scope in [*root.glob(f"*/corral/{drv.scope}"), root / "corral" / drv.scope]:
                with contextlib.suppress(OSError):
                    scope.rmdir()
    return out


def preflight() -> tuple[Path, str] | str:
    """The guest and the accelerator, or why the bench cannot run here."""
    if os.geteuid() != 0:
        return "needs root (the qemu driver and --netns fleets)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    from corral.drivers.qemu import QemuDriver
    from corral.drivers.qemu_guest import cached

    guest = cached()
    if guest is None:
        return "the test guest is not built (python -m corral.drivers.qemu_guest)"
    probe = QemuDriver(f"vmprobe{os.getpid()}")
    reason = probe.available()
    return reason if reason else (guest, probe.accel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--long", action="store_true", help="512 MiB of guest memory (the issue's)")
    ap.add_argument("--memory-mib", type=int, default=0, help="guest memory (overrides --long)")
    ap.add_argument("--no-runc", action="store_true",
                    help="leave out the warm migration of the writer in a runc container")
    args = ap.parse_args()
    ready = preflight()
    if isinstance(ready, str):
        print(f"skipped: {ready}")
        return
    guest, accel = ready
    memory = (args.memory_mib or (512 if args.long else 256)) * MiB
    print(f"guest {guest.name}, {memory // MiB} MiB, 1 vCPU, accel {accel}, TLS in both, "
          f"downtime limit {DOWNTIME_MS} ms, {args.rounds} rounds", flush=True)
    top = Path(tempfile.mkdtemp(prefix="corral-vmmig-"))
    os.chmod(top, 0o711)
    try:
        print("raw QEMU (QMP):", flush=True)
        (top / "raw").mkdir()
        raw = run_baseline(top / "raw", guest, memory, args.rounds)
        print("corral migrate:", flush=True)
        (top / "corral").mkdir()
        cor, ct = run_corral(top / "corral", guest, memory, args.rounds, not args.no_runc)
    finally:
        kill_all(str(top))
        shutil.rmtree(top, ignore_errors=True)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    print()
    for label, rows in (("raw QEMU", raw), ("corral", cor)):
        print(f"{label:>9}: total {summary([r['wall_s'] for r in rows], 's')}; "
              f"downtime {summary([r['downtime_ms'] for r in rows], 'ms', '.0f')}; "
              f"memory {med(rows, 'memory_mib'):.0f} MiB, disk {med(rows, 'disk_mib'):.0f} MiB")
    print(f"   corral: a held TCP connection's longest pause "
          f"{summary([r['client_pause_ms'] for r in cor], 'ms', '.0f')} (none broke)")
    print(f"   corral: operation span (server) {summary([r['op_s'] for r in cor], 's')}; "
          f"QEMU stream {summary([r['stream_s'] for r in cor], 's')} vs raw "
          f"{summary([r['stream_s'] for r in raw], 's')}")
    steps = [k for k in cor[0] if k.startswith("step:")]
    print("   corral: median per step: " + ", ".join(
        f"{k[5:]} {statistics.median(r.get(k, 0.0) for r in cor):.2f} s" for k in steps))
    if ct:
        print(f"runc warm: total {summary([r['wall_s'] for r in ct], 's')}; downtime "
              f"{summary([r['downtime_ms'] for r in ct], 'ms', '.0f')}; "
              f"{med(ct, 'bytes_mib'):.0f} MiB moved")
    total_ratio = med(cor, "wall_s") / med(raw, "wall_s")
    down_ratio = med(cor, "downtime_ms") / max(med(raw, "downtime_ms"), 1.0)
    print(json.dumps({"rounds": args.rounds, "memory_mib": memory // MiB, "accel": accel,
                      "tls": True}))
    print(f"figure: vm_migrate.corral_total {med(cor, 'wall_s'):.2f} s")
    print(f"figure: vm_migrate.corral_downtime {med(cor, 'downtime_ms'):.0f} ms")
    print(f"figure: vm_migrate.client_pause {med(cor, 'client_pause_ms'):.0f} ms")
    print(f"figure: vm_migrate.raw_qemu_total {med(raw, 'wall_s'):.2f} s")
    print(f"figure: vm_migrate.raw_qemu_downtime {med(raw, 'downtime_ms'):.0f} ms")
    print(f"figure: vm_migrate.corral_memory_moved {med(cor, 'memory_mib'):.0f} MiB")
    print(f"figure: vm_migrate.corral_disk_moved {med(cor, 'disk_mib'):.0f} MiB")
    print(f"figure: vm_migrate.total_ratio {total_ratio:.2f} x")
    print(f"figure: vm_migrate.downtime_ratio {down_ratio:.2f} x")
    if ct:
        print(f"figure: vm_migrate.runc_warm_total {med(ct, 'wall_s'):.2f} s")
        print(f"figure: vm_migrate.runc_warm_downtime {med(ct, 'downtime_ms'):.0f} ms")


if __name__ == "__main__":
    main()
