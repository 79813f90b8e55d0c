"""Schemathesis against a real server (issue 10, item 3): every operation of the server's own
OpenAPI document, with cases made from its schema (valid ones and invalid ones), sent as the
fleet's admin, as a read-only token and without a token.

What must hold, case by case: no 5xx; every answer's status, content type, headers and body
are what the document declares; without a token every route but the public ones answers 401;
with a read-only token no route but a GET does anything (403, never a 2xx). The number of
cases per operation is bounded and the generation derandomized, so a run is the same run
every time and stays within about a minute.

The server is ``python -m corral.control`` in its own process (as in test_api_server.py):
schemathesis' client blocks, and the server must keep its own event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
requests = pytest.importorskip("requests")

from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi import checks as oa  # noqa: E402

pytestmark = pytest.mark.timeout(300)

#: cases per operation and generation mode, per identity
EXAMPLES = {"admin": 20, "read-only": 6, "anonymous": 3}
#: routes that take no bearer token (the guard's table says which)
PUBLIC = {("GET", "/healthz"), ("POST", "/v1/hosts/{name}/join")}
WRITES = {"POST", "PUT", "PATCH", "DELETE"}
CHECKS = [not_a_server_error, oa.status_code_conformance, oa.content_type_conformance,
          oa.response_headers_conformance, oa.response_schema_conformance]


@dataclass
class Server:
    url: str
    token: str
    verify: str | bool
    spec: dict[str, Any]
    proc: subprocess.Popen[bytes]


@dataclass
class Tally:
    operations: int = 0
    cases: int = 0
    failures: list[str] = field(default_factory=list)
    by_status: dict[int, int] = field(default_factory=dict)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("fuzz")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update({"CORRAL_DATA_DIR": str(data), "CORRAL_API_PORT": "0",
                "CORRAL_LOG_LEVEL": "warning"})
    proc = subprocess.Popen([sys.executable, "-m", "corral.control"], env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=(data / "server.err").open("wb"))
    try:
        info = _wait_ready(data / "server.json", proc)
        token = (data / "token").read_text().strip()
        verify: str | bool = info.get("ca_file") or True
        spec = requests.get(f"{info['api_url']}/openapi.json", timeout=30, verify=verify,
                            headers={"Authorization": f"Bearer {token}"}).json()
        yield Server(info["api_url"], token, verify, spec, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_ready(path: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = (path.parent / "server.err").read_text()[-2000:]
            raise AssertionError(f"server exited with {proc.returncode}: {err}")
        if path.exists():
            return dict(json.loads(path.read_text()))
        time.sleep(0.05)
    raise AssertionError("the server never wrote server.json")


def fuzz(srv: Server, headers: dict[str, str], examples: int,
         extra: Callable[[Any, Any], str | None]) -> Tally:
    """Every operation, ``examples`` valid and ``examples`` invalid cases each; ``extra(case,
    response)`` is this identity's own rule (the reason it fails, or None)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_dict(srv.spec)
    tally = Tally()
    session = requests.Session()
    session.verify = srv.verify
    for result in schema.get_all_operations():
        op = result.ok()
        tally.operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def one(case: Any) -> None:
                if isinstance(case.query, dict) and case.query.get("follow") not in (
                        None, False, "false"):
                    case.query["follow"] = "false"  # a followed stream never ends
                tally.cases += 1
                # the identity under test, whatever the case made of the security scheme
                sent = {k: v for k, v in (case.headers or {}).items()
                        if k.lower() != "authorization"}
                case.headers = {**sent, **headers}
                try:
                    response = case.call(base_url=srv.url, session=session, timeout=30)
                except requests.RequestException as exc:
                    tally.failures.append(f"{case.operation.label}: no answer: {exc}")
                    return
                status = response.status_code
                tally.by_status[status] = tally.by_status.get(status, 0) + 1
                try:
                    case.validate_response(response, checks=CHECKS, headers=case.headers)
                except (Exception, BaseExceptionGroup) as exc:  # failures: recorded, not raised
                    kinds = [str(e).strip().splitlines()[0] for e in getattr(
                        exc, "exceptions", [exc])]
                    tally.failures.append(f"{case.operation.label} [{status}]: "
                                          f"{'; '.join(kinds)}: {response.text[:300]}")
                why = extra(case, response)
                if why is not None:
                    tally.failures.append(f"{case.operation.label} [{status}]: {why}")

            with contextlib.suppress(Unsatisfiable):  # nothing to make invalid (no parameters)
                one()
    session.close()
    return tally


def _route(case: Any) -> tuple[str, str]:
    return str(case.operation.method).upper(), str(case.operation.path)


def test_no_5xx_and_no_write_without_the_right_token(server: Server) -> None:
    ro_name = f"fuzz-ro-{uuid.uuid4().hex[:8]}"
    made = requests.post(f"{server.url}/v1/tokens", verify=server.verify, timeout=30,
                         json={"name": ro_name, "role": "read-only"},
                         headers={"Authorization": f"Bearer {server.token}"})
    assert made.status_code == 201, made.text
    read_only = made.json()["token"]
    refused_writes: set[tuple[str, str]] = set()

    def anonymous(case: Any, response: Any) -> str | None:
        if _route(case) in PUBLIC or response.status_code == 401:
            return None
        return f"answered {response.status_code} without a token (401 expected)"

    def reader(case: Any, response: Any) -> str | None:
        method, _ = _route(case)
        if method not in WRITES or _route(case) in PUBLIC:
            return None
        if response.status_code == 403:
            refused_writes.add(_route(case))
            return None
        if response.status_code in (404, 405) and response.json()["error"]["code"] in (
                "not_found", "http_error"):
            return None  # a generated path no route has (a '/' in a name): nothing ran
        return f"a read-only token's {method} answered {response.status_code} (403 expected)"

    runs = {
        "anonymous": fuzz(server, {}, EXAMPLES["anonymous"], anonymous),
        "read-only": fuzz(server, {"Authorization": f"Bearer {read_only}"},
                          EXAMPLES["read-only"], reader),
        "admin": fuzz(server, {"Authorization": f"Bearer {server.token}"}, EXAMPLES["admin"],
                      lambda case, response: None),
    }
    summary = {who: (t.operations, t.cases, len(t.failures)) for who, t in runs.items()}
    print(f"\nschemathesis (operations, cases, failures): {summary}")
    failures = [f"{who}: {f}" for who, t in runs.items() for f in t.failures]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(sorted(set(failures))[:60])
    writes = {(m.upper(), p) for p, ops in server.spec["paths"].items() for m in ops
              if m.upper() in WRITES} - PUBLIC
    assert writes - refused_writes == set(), "every write was tried with the read-only token"
    assert all(t.operations == runs["admin"].operations > 30 for t in runs.values())
    assert server.proc.poll() is None  # and the server is still up
