"""The one HTTP client every caller of the API uses (CLI, tour, tests).

It turns the server's JSON error bodies back into the :mod:`corral.errors` exception the server
raised, so the CLI formats an agent's or scheduler's own words (with its hint and exit code)
instead of an HTTP status. Routes are spelled out only here.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from collections.abc import Iterator
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from corral import errors
from corral.api.models import (
    CreateInstance,
    Event,
    FleetStatus,
    HostView,
    InstanceView,
    MigrateRequest,
    OperationView,
    RecreateRequest,
    ShelfView,
    ShelveRequest,
    StandbyRequest,
    StandbyView,
    TrafficView,
    UnshelveRequest,
)

M = TypeVar("M", bound=BaseModel)

UNREACHABLE_HINT = "is the fleet up? run 'corral up' or set CORRAL_URL"

_HOSTS = TypeAdapter(list[HostView])
_INSTANCES = TypeAdapter(list[InstanceView])
_OPS = TypeAdapter(list[OperationView])
_STANDBYS = TypeAdapter(list[StandbyView])
_SHELVES = TypeAdapter(list[ShelfView])


class Client:
    """Typed methods over the ``/v1`` API; every failure is a :class:`corral.errors.CorralError`."""

    def __init__(self, base_url: str, token: str, timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            verify=_tls_context(self.base_url),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resources -------------------------------------------------------------------------

    def status(self) -> FleetStatus:
        return FleetStatus.model_validate(self._json("GET", "/v1/status"))

    def hosts(self) -> list[HostView]:
        return _HOSTS.validate_python(self._json("GET", "/v1/hosts"))

    def host(self, name: str) -> HostView:
        return HostView.model_validate(self._json("GET", f"/v1/hosts/{name}"))

    def instances(self) -> list[InstanceView]:
        return _INSTANCES.validate_python(self._json("GET", "/v1/instances"))

    def instance(self, name: str) -> InstanceView:
        return InstanceView.model_validate(self._json("GET", f"/v1/instances/{name}"))

    def create(self, spec: CreateInstance) -> InstanceView:
        body = spec.model_dump(mode="json")
        return InstanceView.model_validate(self._json("POST", "/v1/instances", json=body))

    def action(
        self,
        name: str,
        verb: str,
        timeout: float | None = None,
        signal: int | None = None,
    ) -> InstanceView:
        """One lifecycle verb (start, stop, kill, restart, freeze, thaw) on an instance."""
        body: dict[str, Any] = {}
        if timeout is not None:
            body["timeout"] = timeout
        if signal is not None:
            body["signal"] = signal
        # a stop waits for its grace period on the agent: let the HTTP call wait as long.
        wait = None if timeout is None else max(self._http.timeout.read or 30.0, timeout + 30.0)
        raw = self._json("POST", f"/v1/instances/{name}/{verb}", json=body, read_timeout=wait)
        return InstanceView.model_validate(raw)

    def delete(self, name: str, force: bool = False) -> None:
        params = {"force": "true"} if force else None
        self._request("DELETE", f"/v1/instances/{name}", params=params)

    def logs(self, name: str, since: str | None = None, follow: bool = False,
             source: str | None = None) -> Iterator[dict[str, Any]]:
        """An instance's captured lines, oldest first: ``{ts, host, source, seq, line}`` each.
        With ``follow`` the iterator waits for new lines until the caller stops it."""
        params: dict[str, str] = {}
        if since is not None:
            params["since"] = since
        if follow:
            params["follow"] = "true"
        if source is not None:
            params["source"] = source
        for line in self._ndjson(f"/v1/instances/{name}/logs", params, follow, "logs"):
            yield json.loads(line)

    def metrics_text(self) -> str:
        return self._request("GET", "/metrics").text

    def events(self, since: str | None = None, after: int | None = None, follow: bool = False,
               types: list[str] | None = None, instance: str | None = None
               ) -> Iterator[Event]:
        """Events in index order; with ``follow`` the iterator waits for new ones until the
        caller stops it."""
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("type", t) for t in types or []]
        for key, value in (("since", since), ("after", after), ("instance", instance)):
            if value is not None:
                params.append((key, str(value)))
        if follow:
            params.append(("follow", "true"))
        for line in self._ndjson("/v1/events", params, follow, "events"):
            yield Event.model_validate_json(line)

    def traffic(self, name: str, url: str | None = None, limit: int = 30) -> TrafficView:
        """The live traffic view of one instance (and ``url``'s latest clients)."""
        params = {"limit": str(limit), **({"url": url} if url is not None else {})}
        raw = self._json("GET", f"/v1/instances/{name}/traffic", params=params)
        return TrafficView.model_validate(raw)

    def ops(self, target: str | None = None, limit: int = 50) -> list[OperationView]:
        """Operations, newest first (only ``target``'s when given)."""
        params = {"limit": str(limit), **({"target": target} if target else {})}
        return _OPS.validate_python(self._json("GET", "/v1/ops", params=params))

    def op(self, op_id: str) -> OperationView:
        return OperationView.model_validate(self._json("GET", f"/v1/ops/{op_id}"))

    def recreate(self, name: str, to: str | None = None) -> OperationView:
        """Start ``recreate`` on ``name``; returns the operation as first recorded (follow it
        with :meth:`op`)."""
        body = RecreateRequest(to=to).model_dump(mode="json")
        raw = self._json("POST", f"/v1/instances/{name}/recreate", json=body)
        return OperationView.model_validate(raw)

    def migrate(self, name: str, to: str | None = None, cold: bool = False) -> OperationView:
        """Start ``migrate``; returns the operation as first recorded (follow it with
        :meth:`op`)."""
        body = MigrateRequest(to=to, cold=cold).model_dump(mode="json")
        return OperationView.model_validate(
            self._json("POST", f"/v1/instances/{name}/migrate", json=body))

    def standbys(self) -> list[StandbyView]:
        return _STANDBYS.validate_python(self._json("GET", "/v1/standbys"))

    def standby_add(self, name: str, host: str | None, every: float) -> OperationView:
        """Record a standby and start its first refresh (the returned operation)."""
        body = StandbyRequest(host=host, every_seconds=every).model_dump(mode="json")
        return OperationView.model_validate(
            self._json("POST", f"/v1/instances/{name}/standby", json=body))

    def standby_op(self, name: str, verb: str) -> OperationView:
        """``sync`` or ``promote``: start that operation on ``name``'s standby."""
        return OperationView.model_validate(
            self._json("POST", f"/v1/instances/{name}/standby/{verb}"))

    def standby_rm(self, name: str) -> None:
        self._request("DELETE", f"/v1/instances/{name}/standby")

    def shelve(self, name: str, offload_after: float | None = None) -> OperationView:
        """Start ``shelve`` on ``name`` (``offload_after`` seconds; negative: never; None:
        the server's default); returns the operation as first recorded."""
        body = ShelveRequest(offload_after=offload_after).model_dump(mode="json")
        raw = self._json("POST", f"/v1/instances/{name}/shelve", json=body)
        return OperationView.model_validate(raw)

    def unshelve(self, name: str, to: str | None = None) -> OperationView:
        body = UnshelveRequest(to=to).model_dump(mode="json")
        raw = self._json("POST", f"/v1/instances/{name}/unshelve", json=body)
        return OperationView.model_validate(raw)

    def shelves(self) -> list[ShelfView]:
        return _SHELVES.validate_python(self._json("GET", "/v1/shelves"))

    def health(self) -> bool:
        """True when the server answers its unauthenticated health route."""
        try:
            return self._http.get("/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    # -- plumbing --------------------------------------------------------------------------

    def _ndjson(self, path: str, params: Any, follow: bool, what: str) -> Iterator[str]:
        """Lines of a streamed NDJSON answer; ``follow`` waits for more without a read timeout."""
        timeout = httpx.Timeout(None if follow else 60.0, connect=10.0)
        try:
            with self._http.stream("GET", path, params=params, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise error_from_response(resp)
                for line in resp.iter_lines():
                    if line.strip():
                        yield line
        except httpx.TransportError as exc:
            raise errors.CorralError(f"reading {what} from {self.base_url} failed: {exc}",
                                     hint=UNREACHABLE_HINT, retryable=True) from exc

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._request(method, path, **kw).json()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> httpx.Response:
        extra: dict[str, Any] = {}
        if read_timeout is not None:
            extra["timeout"] = httpx.Timeout(read_timeout, connect=10.0)
        try:
            resp = self._http.request(method, path, json=json, params=params, **extra)
        except httpx.ConnectError as exc:
            raise errors.CorralError(
                f"cannot reach the corral server at {self.base_url}: {exc}",
                hint=UNREACHABLE_HINT,
                retryable=True,
            ) from exc
        except httpx.TimeoutException as exc:
            raise errors.HostUnavailable(
                f"the corral server at {self.base_url} did not answer {method} {path} in time",
                hint="the server may be overloaded or an agent slow; try again, or check "
                "'corral status'",
            ) from exc
        except httpx.HTTPError as exc:
            raise errors.CorralError(
                f"talking to {self.base_url} failed: {exc}", hint=UNREACHABLE_HINT
            ) from exc
        if resp.status_code >= 400:
            raise error_from_response(resp)
        return resp


def _tls_context(base_url: str) -> ssl.SSLContext | bool:
    """httpx's default verification (certifi's CA bundle) wherever TLS can happen. A plain-HTTP
    fleet reached without a proxy never makes a TLS connection, yet loading that bundle costs
    ~40-70 ms of every CLI command; there a context that trusts nothing is free to build, and
    it would refuse any TLS connection rather than skip a check."""
    if not base_url.lower().startswith("http://") or urllib.request.getproxies():
        return True
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def error_from_response(resp: httpx.Response) -> errors.CorralError:
    """The exception a failed response stands for: the server's own error when it sent one."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return errors.from_dict(body["error"])
    if isinstance(body, dict) and "detail" in body:
        return _from_detail(resp.status_code, body["detail"])
    text = resp.text.strip()[:200] or resp.reason_phrase
    if resp.status_code == 401:
        return errors.Unauthorized(
            f"the server refused the token: {text}",
            hint="check CORRAL_TOKEN or the context file written by 'corral up'",
        )
    if resp.status_code == 404:
        return errors.NotFound(f"not found: {resp.request.url.path}")
    return errors.CorralError(f"HTTP {resp.status_code} from the server: {text}")


def _from_detail(status: int, detail: Any) -> errors.CorralError:
    """FastAPI's own error shape (``{"detail": ...}``), e.g. a validation error not wrapped."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg")))
        message = "invalid request: " + "; ".join(parts)
        return errors.InvalidRequest(message, hint="fix the fields named above")
    cls: type[errors.CorralError] = {
        401: errors.Unauthorized,
        404: errors.NotFound,
        409: errors.Conflict,
        422: errors.InvalidRequest,
    }.get(status, errors.CorralError)
    return cls(str(detail))
