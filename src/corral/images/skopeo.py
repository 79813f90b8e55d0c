"""skopeo, the transport of ``corral image pull`` and ``push``: references, runs, errors.

skopeo is run with a bare argv (no shell), its stderr kept in a file (a pipe nobody reads while
it copies would stall it once full), and its failures turned into corral's errors by what they
say: a tag or image that is not there is :class:`NotFound`, a digest that does not match is
:class:`InvalidRequest` (the bytes are not the image's), a refused login or an unreachable
registry :class:`TransferFailed` with what to do about it.

Signature policy: skopeo refuses to run without one. The system's (``/etc/containers/
policy.json``, Debian ships one that accepts any image) or the user's is used when there is
one; otherwise a policy accepting any image, as Debian's default does, is written for the run.
Digests are verified either way; signatures are the policy's business.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from corral.errors import ConfigError, CorralError, InvalidRequest, NotFound, TransferFailed

TRANSPORTS = ("docker://", "oci:", "oci-archive:", "docker-archive:")
#: seconds between looks at how much a copy has written
POLL = 0.2
_POLICIES = ("~/.config/containers/policy.json", "/etc/containers/policy.json")
_AUTH_HINT = ("give credentials with --authfile FILE (containers-auth.json: "
              "{\"auths\": {\"REGISTRY\": {\"auth\": base64 of user:password}}})")


def check_ref(ref: str) -> str:
    """A reference skopeo may read or write, with a local path made absolute."""
    if "\x00" in ref or "\n" in ref or len(ref) > 4096:
        raise InvalidRequest(f"bad image reference {ref[:80]!r}",
                             hint="e.g. docker://registry.example:5000/repo:tag")
    for t in TRANSPORTS:
        if ref.startswith(t):
            rest = ref[len(t):]
            if not rest:
                break
            if t == "docker://":
                return ref
            return t + _absolute(rest)
    raise InvalidRequest(f"cannot pull or push {ref[:200]!r}",
                         hint="use docker://REGISTRY/REPO:TAG, oci:DIR[:TAG], oci-archive:FILE "
                              "or docker-archive:FILE")


def _absolute(rest: str) -> str:
    path, colon, tag = rest.partition(":")
    return str(Path(path).expanduser().absolute()) + colon + tag


def binary() -> str:
    found = shutil.which("skopeo")
    if found is None:
        raise ConfigError("skopeo is not installed: corral moves images to and from "
                          "registries with it", hint="apt-get install skopeo")
    return found


def _argv(*args: str) -> tuple[list[str], tempfile.TemporaryDirectory[str] | None]:
    argv = [binary()]
    if not any(Path(p).expanduser().is_file() for p in _POLICIES):
        scratch = tempfile.TemporaryDirectory(prefix="corral-skopeo-")
        policy = Path(scratch.name) / "policy.json"
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        return [*argv, "--policy", str(policy), *args], scratch
    return [*argv, *args], None


def _auth(flag: str, authfile: str | None) -> list[str]:
    if authfile is None:
        return []
    path = Path(authfile).expanduser()
    if not path.is_file():
        raise InvalidRequest(f"auth file {authfile} does not exist", hint=_AUTH_HINT)
    return [flag, str(path)]


def size_of(ref: str, *, authfile: str | None = None, insecure: bool = False) -> int | None:
    """Bytes of the image's config and layers as its manifest declares them (for a progress
    bar); None when they are not known up front (an index, a Docker archive). A missing image
    or tag is refused here, before anything is copied."""
    args = ["inspect", "--raw", *_auth("--authfile", authfile)]
    if insecure and ref.startswith("docker://"):
        args.append("--tls-verify=false")
    out = run([*args, ref], what=ref)
    try:
        doc = json.loads(out)
        parts = [doc["config"], *doc["layers"]]
        sizes = [int(p["size"]) for p in parts]
    except (ValueError, KeyError, TypeError):
        return None
    return sum(sizes) if all(s > 0 for s in sizes) else None


def copy(src: str, dest: str, *, src_authfile: str | None = None,
         dest_authfile: str | None = None, src_insecure: bool = False,
         dest_insecure: bool = False, watch: Path | None = None,
         on_bytes: Callable[[int], None] | None = None) -> None:
    """``skopeo copy SRC DEST``; while it runs, ``on_bytes`` is told the bytes under
    ``watch`` (the layout it is writing)."""
    args = ["copy", "--quiet", *_auth("--src-authfile", src_authfile),
            *_auth("--dest-authfile", dest_authfile)]
    if src_insecure and src.startswith("docker://"):
        args.append("--src-tls-verify=false")
    if dest_insecure and dest.startswith("docker://"):
        args.append("--dest-tls-verify=false")
    run([*args, src, dest], what=src if dest.startswith("oci:") else dest, watch=watch,
        on_bytes=on_bytes)


def run(args: list[str], *, what: str, watch: Path | None = None,
        on_bytes: Callable[[int], None] | None = None) -> str:
    argv, scratch = _argv(*args)
    try:
        with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=_env())
            try:
                while proc.poll() is None:
                    if watch is not None and on_bytes is not None:
                        on_bytes(bytes_under(watch))
                    time.sleep(POLL)
            finally:
                if proc.poll() is None:  # interrupted: leave no skopeo behind
                    proc.kill()
                    proc.wait()
            if watch is not None and on_bytes is not None:
                on_bytes(bytes_under(watch))
            err.seek(0)
            out.seek(0)
            if proc.returncode != 0:
                raise classify(err.read().decode(errors="replace"), what)
            return out.read().decode(errors="replace")
    finally:
        if scratch is not None:
            scratch.cleanup()


def _env() -> dict[str, str]:
    """skopeo's environment: the caller's, less corral's own settings (the fleet token)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}


def bytes_under(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                continue  # renamed or removed meanwhile
    return total


def classify(stderr: str, what: str) -> CorralError:
    """skopeo's complaint as the corral error that says what to do."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    said = lines[-1] if lines else "no output"
    quoted = re.search(r'msg="((?:[^"\\]|\\.)*)"', said)  # logrus: time=… level=fatal msg="…"
    if quoted:
        said = quoted.group(1).replace('\\"', '"')
    said = said[-600:]
    low = stderr.lower()
    if "manifest unknown" in low or "name unknown" in low or "no descriptor found" in low \
            or "not found" in low or "no such file or directory" in low \
            or "does not exist" in low:
        return NotFound(f"{what}: no such image or tag ({said})",
                        hint="check the reference: the repository, the tag, the path")
    if "digest did not match" in low or "digest mismatch" in low \
            or "size mismatch" in low:
        return InvalidRequest(f"{what}: a blob does not match its digest ({said})",
                              hint="the image is damaged or was tampered with; nothing was "
                                   "stored")
    if "unauthorized" in low or "authentication required" in low or "denied" in low:
        return TransferFailed(f"{what}: the registry refused us ({said})", hint=_AUTH_HINT)
    if "http response to https client" in low:
        return TransferFailed(f"{what}: the registry speaks plain HTTP ({said})",
                              hint="pass --insecure for a registry without TLS")
    if "certificate" in low or "x509" in low:
        return TransferFailed(f"{what}: the registry's certificate is not trusted ({said})",
                              hint="trust its CA (/etc/containers/certs.d/REGISTRY/ca.crt) or "
                                   "pass --insecure")
    if "connection refused" in low or "no such host" in low or "timeout" in low \
            or "network is unreachable" in low:
        return TransferFailed(f"{what}: the registry cannot be reached ({said})",
                              hint="check the address and that it is up, then retry",
                              retryable=True)
    return TransferFailed(f"skopeo failed on {what}: {said}",
                          hint="see skopeo's message; run the same copy with skopeo by hand "
                               "to see more")
