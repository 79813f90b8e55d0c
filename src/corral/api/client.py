"""The one HTTP client every caller of the API uses: the CLI, ``corral up``'s tour, agents (the
image routes), benches and tests.

It turns the server's JSON error bodies back into the :mod:`corral.errors` exception the server
raised, so the CLI formats an agent's or scheduler's own words (with its hint and exit code)
instead of an HTTP status. Routes are spelled out only here.

Each resource has a ``*_data`` method that returns the server's JSON as it came, and (where
programs want one) a typed method that builds the wire model from it. The wire models
(pydantic) are imported by the typed methods only: ``corral ls --json`` prints what the server
sent and never pays for building them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from corral import errors
from corral.api.transport import (
    UNREACHABLE_HINT,
    Params,
    Transport,
    TransportError,
    TransportTimeout,
    error_from_response,
)

if TYPE_CHECKING:
    from corral.api.models import (
        BatchItem,
        CreateInstance,
        Event,
        FleetStatus,
        HostView,
        InstanceView,
        MetricSeries,
        OperationView,
        ShelfView,
        StandbyView,
        TrafficView,
    )
    from corral.images.records import Record

__all__ = ["UNREACHABLE_HINT", "Client", "TransportError", "TransportTimeout",
           "error_from_response"]

JSON = "application/json"
OCTETS = "application/octet-stream"
#: instances asked for per request when listing them all: ~650 KB of JSON, a fraction of a
#: second of the server's loop, where the whole list of 100k instances was 63 MB and ~23 s
PAGE_SIZE = 1000
#: the response header naming the next page's cursor (``GET /v1/instances``; the server's
#: route takes it from here)
NEXT_HEADER = "X-Corral-Next"


class Client:
    """Typed methods over the ``/v1`` API; every failure is a :class:`corral.errors.CorralError`
    (:class:`TransportError` when no answer came at all). One connection, kept open between
    requests; use a client from one thread at a time."""

    def __init__(self, base_url: str, token: str, timeout: float = 30,
                 ca_file: str | None = None) -> None:
        """``ca_file``: trust this CA bundle for https instead of the system's store (which
        also honours ``SSL_CERT_FILE``)."""
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._http = Transport(self.base_url, {"Authorization": f"Bearer {token}"}, timeout,
                               ca_file)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fleet, hosts, instances -----------------------------------------------------------

    def status_data(self) -> dict[str, Any]:
        return dict(self._json("GET", "/v1/status"))

    def status(self) -> FleetStatus:
        from corral.api.models import FleetStatus

        return FleetStatus.model_validate(self.status_data())

    def hosts_data(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/v1/hosts"))

    def hosts(self) -> list[HostView]:
        from corral.api.models import HostView

        return [HostView.model_validate(h) for h in self.hosts_data()]

    def host_add(self, name: str) -> dict[str, Any]:
        """A one-time join token for host ``name`` (``corral host add``)."""
        return dict(self._json("POST", "/v1/hosts", json_body={"name": name}))

    def host_join(self, name: str, token: str, public_key: str, csr: str, address: str
                  ) -> dict[str, Any]:
        """Trade a join token for host ``name``'s identity (the agent's first start)."""
        body = {"token": token, "public_key": public_key, "csr": csr, "address": address}
        return dict(self._json("POST", f"/v1/hosts/{name}/join", json_body=body))

    def host_rm(self, name: str) -> None:
        """Revoke host ``name`` and forget it (``corral host rm``)."""
        self._http.request("DELETE", f"/v1/hosts/{name}")

    def host_drain(self, name: str, deadline: float | None = None, parallel: int = 4
                   ) -> dict[str, Any]:
        """Start draining host ``name`` (one server-side operation group); its record as
        first saved."""
        body = {"deadline_seconds": deadline, "parallel": parallel}
        return dict(self._json("POST", f"/v1/hosts/{name}/drain", json_body=body))

    def host_undrain(self, name: str) -> dict[str, Any]:
        """Clear host ``name``'s drain mark (``corral host undrain``)."""
        return dict(self._json("POST", f"/v1/hosts/{name}/undrain", json_body={}))

    def host_data(self, name: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/hosts/{name}"))

    def host(self, name: str) -> HostView:
        from corral.api.models import HostView

        return HostView.model_validate(self.host_data(name))

    def instances_data(self, limit: int | None = None, after: str | None = None,
                       host: str | None = None, state: str | None = None
                       ) -> list[dict[str, Any]]:
        """Every instance (on ``host``, in ``state``), by name, fetched a page at a time; with
        a ``limit``, one page: at most that many named after ``after``."""
        if limit is not None:
            return self.instances_page(limit, after, host, state)[0]
        return [i for page in self.instance_pages(after, host, state) for i in page]

    def instances(self, limit: int | None = None, after: str | None = None,
                  host: str | None = None, state: str | None = None) -> list[InstanceView]:
        from corral.api.models import InstanceView

        return [InstanceView.model_validate(i)
                for i in self.instances_data(limit, after, host, state)]

    def instances_page(self, limit: int | None = None, after: str | None = None,
                       host: str | None = None, state: str | None = None
                       ) -> tuple[list[dict[str, Any]], str | None]:
        """One answer of ``GET /v1/instances`` and the cursor of the next page (None: this
        was the last). Without a ``limit`` the server sends the whole list at once (what a
        server older than paging always does: it sends no cursor, so callers end there)."""
        params = [(k, v) for k, v in (("limit", None if limit is None else str(limit)),
                                      ("after", after), ("host", host), ("state", state))
                  if v is not None]
        resp = self._http.request("GET", "/v1/instances", params=params or None)
        return list(resp.json()), resp.headers.get(NEXT_HEADER) or None

    def instance_pages(self, after: str | None = None, host: str | None = None,
                       state: str | None = None, page_size: int | None = None
                       ) -> Iterator[list[dict[str, Any]]]:
        """The instances page by page (``page_size``, default :data:`PAGE_SIZE`), following
        the server's cursor, so a caller can show the first ones while the rest come and
        neither side ever holds a 100k-instance answer. An instance created or removed
        meanwhile may or may not be listed; none is listed twice."""
        size = page_size or PAGE_SIZE
        while True:
            page, cursor = self.instances_page(size, after, host, state)
            yield page
            if cursor is None:
                return
            if not page or cursor == after:  # a server that would page forever
                raise errors.CorralError(
                    f"the server sent the cursor '{cursor}' again while listing instances",
                    hint="this is a bug in the corral server; 'corral ls --limit' shows the "
                         "first ones meanwhile")
            after = cursor

    def instance_data(self, name: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/instances/{name}"))

    def instance(self, name: str) -> InstanceView:
        from corral.api.models import InstanceView

        return InstanceView.model_validate(self.instance_data(name))

    def create(self, spec: CreateInstance) -> InstanceView:
        from corral.api.models import InstanceView

        raw = self._json("POST", "/v1/instances", json_body=spec.model_dump(mode="json"))
        return InstanceView.model_validate(raw)

    def create_many(self, specs: Sequence[CreateInstance]) -> list[BatchItem]:
        """Many creates in one call; an item per spec, in order, each with its own outcome."""
        from corral.api.models import BatchCreated

        raw = self._json("POST", "/v1/instances/batch", json_body={
            "instances": [s.model_dump(mode="json") for s in specs]})
        return BatchCreated.model_validate(raw).results

    def action_data(self, name: str, verb: str, timeout: float | None = None,
                    signal: int | None = None) -> dict[str, Any]:
        """One lifecycle verb (start, stop, kill, restart, freeze, thaw) on an instance."""
        body: dict[str, Any] = {}
        if timeout is not None:
            body["timeout"] = timeout
        if signal is not None:
            body["signal"] = signal
        # a stop waits for its grace period on the agent: let the HTTP call wait as long.
        wait = None if timeout is None else max(self.timeout, timeout + 30.0)
        return dict(self._json("POST", f"/v1/instances/{name}/{verb}", json_body=body,
                               read_timeout=wait))

    def action(self, name: str, verb: str, timeout: float | None = None,
               signal: int | None = None) -> InstanceView:
        from corral.api.models import InstanceView

        return InstanceView.model_validate(self.action_data(name, verb, timeout, signal))

    def delete(self, name: str, force: bool = False) -> None:
        params = {"force": "true"} if force else None
        self._http.request("DELETE", f"/v1/instances/{name}", params=params)

    def metrics_text(self) -> str:
        return self._http.request("GET", "/metrics").text

    def health(self) -> bool:
        """True when the server answers its unauthenticated health route."""
        try:
            return self._http.request("GET", "/healthz", read_timeout=2.0,
                                      check=False).status == 200
        except TransportError:
            return False

    # -- streams ---------------------------------------------------------------------------

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

    def event_lines(self, since: str | None = None, after: int | None = None,
                    follow: bool = False, types: list[str] | None = None,
                    instance: str | None = None, quiet_for: float | None = None
                    ) -> Iterator[str]:
        """Events in index order, each the server's JSON line (without its newline); with
        ``follow`` the iterator waits for new ones until the caller stops it (or, with
        ``quiet_for``, until no event came for that many seconds: a TransportError whose
        reason is "timed out")."""
        params: list[tuple[str, str]] = [("type", t) for t in types or []]
        for key, value in (("since", since), ("after", after), ("instance", instance)):
            if value is not None:
                params.append((key, str(value)))
        if follow:
            params.append(("follow", "true"))
        timeout = quiet_for if quiet_for is not None else None if follow else 60.0
        for line in self._http.lines("/v1/events", params, timeout, "events"):
            yield line.decode().rstrip("\r\n")

    def events(self, since: str | None = None, after: int | None = None, follow: bool = False,
               types: list[str] | None = None, instance: str | None = None
               ) -> Iterator[Event]:
        from corral.api.models import Event

        for line in self.event_lines(since, after, follow, types, instance):
            yield Event.model_validate_json(line)

    def traffic_data(self, name: str, url: str | None = None, limit: int = 30
                     ) -> dict[str, Any]:
        """The live traffic view of one instance (and ``url``'s latest clients)."""
        params = {"limit": str(limit), **({"url": url} if url is not None else {})}
        return dict(self._json("GET", f"/v1/instances/{name}/traffic", params=params))

    def traffic(self, name: str, url: str | None = None, limit: int = 30) -> TrafficView:
        from corral.api.models import TrafficView

        return TrafficView.model_validate(self.traffic_data(name, url, limit))

    # -- metric history --------------------------------------------------------------------

    def metrics_data(self, name: str, since: float | str | None = None,
                     until: float | str | None = None, host: bool = False) -> dict[str, Any]:
        """The server's CPU and memory history of an instance (or, with ``host``, a host)
        from ``since`` (unix seconds, or 2h, an ISO time...; default an hour ago)."""
        params = {k: str(v) for k, v in (("since", since), ("until", until)) if v is not None}
        kind = "hosts" if host else "instances"
        return dict(self._json("GET", f"/v1/{kind}/{name}/metrics", params=params))

    def metrics(self, name: str, since: float | str | None = None,
                until: float | str | None = None) -> MetricSeries:
        from corral.api.models import MetricSeries

        return MetricSeries.model_validate(self.metrics_data(name, since, until))

    def host_metrics(self, name: str, since: float | str | None = None,
                     until: float | str | None = None) -> MetricSeries:
        from corral.api.models import MetricSeries

        return MetricSeries.model_validate(self.metrics_data(name, since, until, host=True))

    # -- API tokens ------------------------------------------------------------------------

    def token_create(self, name: str, role: str) -> dict[str, Any]:
        """A new named token with ``role`` (admin, read-only, host): the answer's ``token``
        is shown this once, the server keeps only its hash."""
        return dict(self._json("POST", "/v1/tokens", json_body={"name": name, "role": role}))

    def tokens_data(self) -> list[dict[str, Any]]:
        """Named tokens (name, role, created_at), never their secrets."""
        return list(self._json("GET", "/v1/tokens"))

    def token_revoke(self, name: str) -> None:
        self._http.request("DELETE", f"/v1/tokens/{name}")

    # -- operations, standbys, shelves -----------------------------------------------------

    def ops_data(self, target: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Operations, newest first (only ``target``'s when given)."""
        params = {"limit": str(limit), **({"target": target} if target else {})}
        return list(self._json("GET", "/v1/ops", params=params))

    def ops(self, target: str | None = None, limit: int = 50) -> list[OperationView]:
        return [_op(o) for o in self.ops_data(target, limit)]

    def op_data(self, op_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/ops/{op_id}"))

    def op(self, op_id: str) -> OperationView:
        return _op(self.op_data(op_id))

    def watch_op(self, op: dict[str, Any], until: float, quiet_for: float = 5.0
                 ) -> Iterator[dict[str, Any]]:
        """The operation ``op`` each time it changes, until it has finished or the monotonic
        clock passes ``until``; the last one yielded is the newest known.

        It follows the server's events (``operation.changed``) rather than asking every
        fraction of a second. Until a first event has come, a change may fall between two
        streams, so the record is read again after half a second of quiet; after that each
        stream resumes at the last event seen (nothing is missed) and the record is read
        again only after ``quiet_for`` seconds of quiet (a step may take hours) or when the
        stream breaks."""
        from corral.api.transport import TransportError

        yield op
        after: int | None = None
        while not op.get("finished") and time.monotonic() < until:
            quiet = quiet_for if after is not None else 0.5
            wait = max(0.2, min(quiet, until - time.monotonic()))
            lines = self.event_lines(after=after, follow=True, types=["operation.changed"],
                                     instance=str(op["target"]), quiet_for=wait)
            changed = False
            try:
                for line in lines:
                    ev = json.loads(line)
                    after = int(ev.get("index") or 0) or after
                    if (ev.get("data") or {}).get("id") == op["id"]:
                        changed = True
                        break
            except TransportError:
                pass  # quiet, or the stream broke: look at the record, then follow again
            finally:
                close = getattr(lines, "close", None)
                if close is not None:
                    close()
            fresh = self.op_data(str(op["id"]))
            if changed or fresh != op:
                op = fresh
                yield op

    def recreate(self, name: str, to: str | None = None) -> OperationView:
        """Start ``recreate`` on ``name``; returns the operation as first recorded (follow it
        with :meth:`op`)."""
        from corral.api.models import RecreateRequest

        body = RecreateRequest(to=to).model_dump(mode="json")
        return _op(self._json("POST", f"/v1/instances/{name}/recreate", json_body=body))

    def migrate(self, name: str, to: str | None = None, cold: bool = False) -> OperationView:
        """Start ``migrate``; returns the operation as first recorded (follow it with
        :meth:`op`)."""
        from corral.api.models import MigrateRequest

        body = MigrateRequest(to=to, cold=cold).model_dump(mode="json")
        return _op(self._json("POST", f"/v1/instances/{name}/migrate", json_body=body))

    def standbys_data(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/v1/standbys"))

    def standbys(self) -> list[StandbyView]:
        from corral.api.models import StandbyView

        return [StandbyView.model_validate(s) for s in self.standbys_data()]

    def standby_add(self, name: str, host: str | None, every: float) -> OperationView:
        """Record a standby and start its first refresh (the returned operation)."""
        from corral.api.models import StandbyRequest

        body = StandbyRequest(host=host, every_seconds=every).model_dump(mode="json")
        return _op(self._json("POST", f"/v1/instances/{name}/standby", json_body=body))

    def standby_op(self, name: str, verb: str) -> OperationView:
        """``sync`` or ``promote``: start that operation on ``name``'s standby."""
        return _op(self._json("POST", f"/v1/instances/{name}/standby/{verb}"))

    def standby_rm(self, name: str) -> None:
        self._http.request("DELETE", f"/v1/instances/{name}/standby")

    def shelve(self, name: str, offload_after: float | None = None) -> OperationView:
        """Start ``shelve`` on ``name`` (``offload_after`` seconds; negative: never; None:
        the server's default); returns the operation as first recorded."""
        from corral.api.models import ShelveRequest

        body = ShelveRequest(offload_after=offload_after).model_dump(mode="json")
        return _op(self._json("POST", f"/v1/instances/{name}/shelve", json_body=body))

    def unshelve(self, name: str, to: str | None = None) -> OperationView:
        from corral.api.models import UnshelveRequest

        body = UnshelveRequest(to=to).model_dump(mode="json")
        return _op(self._json("POST", f"/v1/instances/{name}/unshelve", json_body=body))

    def unshelve_group(self, names: Sequence[str] = (), all_: bool = False,
                       to: str | None = None, parallel: int = 8) -> dict[str, Any]:
        """Start one server-side operation group that unshelves ``names`` (or every shelved
        instance with ``all_``), ``parallel`` at a time; its record as first saved."""
        body = {"names": list(names), "all": all_, "to": to, "parallel": parallel}
        return dict(self._json("POST", "/v1/unshelve", json_body=body))

    def shelves_data(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/v1/shelves"))

    def shelves(self) -> list[ShelfView]:
        from corral.api.models import ShelfView

        return [ShelfView.model_validate(s) for s in self.shelves_data()]

    # -- the image store -------------------------------------------------------------------
    # What ``corral image ...``, ``corral.images.transfer`` (image import, an agent's chunk
    # cache, shelving) speak; batches are at most ``corral.images.records.MAX_BATCH`` ids.

    def images_data(self) -> list[dict[str, Any]]:
        """Images (shelved disks hidden) with their size, unique size and dedup ratio."""
        return list(self._json("GET", "/v1/images"))

    def image_remove(self, name: str) -> None:
        self._http.request("DELETE", f"/v1/images/{name}")

    def image_verify(self, timeout: float = 3600.0) -> dict[str, Any]:
        """Read back every stored chunk: ``{"damaged": [...]}`` (a whole store takes long)."""
        return dict(self._json("POST", "/v1/images/verify", read_timeout=timeout))

    def image_gc(self) -> dict[str, Any]:
        return dict(self._json("POST", "/v1/images/gc"))

    def manifest(self, name: str) -> tuple[bytes, str]:
        """(manifest JSON, manifest id) of the image or shelved disk ``name``."""
        resp = self._http.request("GET", f"/v1/images/{name}/manifest")
        return resp.body, resp.headers.get("X-Manifest-Id", "")

    def put_manifest(self, name: str, manifest: bytes, replace: bool = False
                     ) -> dict[str, Any]:
        """Name a manifest whose chunks are all stored already (else refused)."""
        resp = self._http.request("PUT", f"/v1/images/{name}", body=manifest,
                                  params={"replace": str(replace).lower()},
                                  headers={"Content-Type": JSON})
        return dict(resp.json())

    def missing_chunks(self, ids: Sequence[bytes]) -> list[bytes]:
        """Which of ``ids`` the store lacks."""
        raw = self._json("POST", "/v1/chunks/missing", json_body={"ids": [i.hex() for i in ids]},
                         retry=True)
        return [bytes.fromhex(h) for h in raw["missing"]]

    def fetch_chunks(self, ids: Sequence[bytes]) -> tuple[list[Record], int]:
        """The stored records of ``ids`` (unverified: the receiving store checks each one),
        and the bytes they took on the wire."""
        from corral.images.records import parse_records

        resp = self._http.request("POST", "/v1/chunks/fetch", retry=True,
                                  json_body={"ids": [i.hex() for i in ids]})
        return parse_records(resp.body), len(resp.body)

    def upload_chunks(self, records: Sequence[Record]) -> int:
        """Send chunk records to the store (which verifies each), in as many requests as the
        server's cap on an upload's body asks for (``MAX_UPLOAD_BYTES``); returns the bytes
        sent."""
        from corral.images.records import MAX_UPLOAD_BYTES, RECORD, encode_records

        sent = size = 0
        batch: list[Record] = []
        for rec in [*records, None]:
            more = RECORD.size + len(rec[2]) if rec is not None else 0
            if batch and (rec is None or size + more > MAX_UPLOAD_BYTES):
                body = encode_records(batch)
                self._http.request("POST", "/v1/chunks/upload", body=body, retry=True,
                                   headers={"Content-Type": OCTETS})
                sent += len(body)
                batch, size = [], 0
            if rec is not None:
                batch.append(rec)
                size += more
        return sent

    # -- plumbing --------------------------------------------------------------------------

    def _json(self, method: str, path: str, *, params: Params = None, json_body: Any = None,
              read_timeout: float | None = None, retry: bool | None = None) -> Any:
        return self._http.request(method, path, params=params, json_body=json_body,
                                  read_timeout=read_timeout, retry=retry).json()

    def _ndjson(self, path: str, params: Params, follow: bool, what: str) -> Iterator[bytes]:
        """Lines of a streamed NDJSON answer; ``follow`` waits for more without a read
        timeout."""
        return self._http.lines(path, params, None if follow else 60.0, what)


def _op(raw: Any) -> OperationView:
    from corral.api.models import OperationView

    return OperationView.model_validate(raw)
