"""Who may call which route, and how large a request body each route takes: one table.

The guard (:mod:`corral.control.http.guard`) reads it before a request reaches its route and
before a byte of its body is read. A route missing from :data:`RULES` gets :data:`DEFAULT`:
bearer token needed, a small JSON body, admin for writes, read-only for GETs, no host.

Roles (tokens: :mod:`corral.control.tokens`):

- ``admin`` (the fleet token, and tokens made with that role): every route;
- ``read-only``: GET routes only (a dashboard, a monitoring job); the token routes not at all;
- a dashboard session (a cookie, :mod:`corral.control.dashboard.sessions`) has its token's
  role, for GET routes and the dashboard's own writes (``session_write``, CSRF header checked);
  no other write is taken from a cookie;
- ``host``: what an agent asks of the image store: a manifest, which chunks are missing,
  fetching and uploading chunks, and naming a *shelved disk* (never an image, never a
  replacement). A host's token on a stolen machine can neither read the fleet nor change it.

Body caps are per route because the bodies differ by six orders of magnitude: a verb takes a
few bytes of JSON, a batch of chunks a few MiB, a manifest many. Each cap is what the largest
legitimate request needs, with room; the client splits chunk uploads to fit
(:data:`corral.images.records.MAX_UPLOAD_BYTES`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from corral.images.http import MAX_MANIFEST_BYTES
from corral.images.records import MAX_BATCH, MAX_UPLOAD_BYTES
from corral.images.store import SHELF_PREFIX

KiB = 1024
MiB = 1024 * KiB

#: every JSON request of the API but those below: a create with its env, a verb, a token
JSON_BODY = 64 * KiB
#: ``MAX_BATCH`` chunk ids as JSON (64 hex digits, quotes and a comma each)
CHUNK_IDS_BODY = max(256 * KiB, MAX_BATCH * 80)
#: one upload of chunk records (the client cuts batches at this size)
UPLOAD_BODY = MAX_UPLOAD_BYTES
#: a manifest (the image routes' own bound): a disk of ~100 GB or a million files
MANIFEST_BODY = MAX_MANIFEST_BYTES
#: ``POST /v1/unshelve`` with its 10,000 names
NAMES_BODY = 1 * MiB
#: a dashboard form (login, an action with its few fields)
FORM_BODY = 4 * KiB
#: ``POST /v1/instances/batch``: MAX_BATCH_CREATE creates of a few KiB each
BATCH_BODY = 4 * MiB

#: methods that only read: all a read-only token may use
READ_METHODS = frozenset({"GET", "HEAD"})

#: (path params, query params) -> why a host token may not make this call (None: it may)
HostCheck = Callable[[Mapping[str, str], Mapping[str, str]], "str | None"]


def _shelf_only(params: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """A host names the shelved disks it uploaded, never an image, and replaces nothing."""
    if not str(params.get("name", "")).startswith(SHELF_PREFIX):
        return "a host token may name shelved disks only, not images"
    if query.get("replace", "false").lower() not in ("false", "0", ""):
        return "a host token may not replace a stored manifest"
    return None


@dataclass(frozen=True)
class Rule:
    """How one route is guarded."""

    #: the most bytes of body it takes
    body: int = JSON_BODY
    #: no bearer token needed (health; an agent's enrolment carries its own credential)
    public: bool = False
    #: a host token may call it (subject to ``host_check``)
    host: bool = False
    host_check: HostCheck | None = None
    #: only an admin may call it, GET included (tokens)
    admin_only: bool = False
    #: a dashboard page: a request without credentials is sent to the login page (303)
    page: bool = False
    #: a dashboard write: a session cookie may POST here, with its CSRF header (no other
    #: write is ever accepted by cookie)
    session_write: bool = False


DEFAULT = Rule()

#: (method, route path as declared) -> its rule
RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): Rule(public=True),
    ("POST", "/v1/hosts/{name}/join"): Rule(public=True),
    ("GET", "/v1/images/{name}/manifest"): Rule(host=True),
    ("POST", "/v1/chunks/missing"): Rule(body=CHUNK_IDS_BODY, host=True),
    ("POST", "/v1/chunks/fetch"): Rule(body=CHUNK_IDS_BODY, host=True),
    ("POST", "/v1/chunks/upload"): Rule(body=UPLOAD_BODY, host=True),
    ("PUT", "/v1/images/{name}"): Rule(body=MANIFEST_BODY, host=True, host_check=_shelf_only),
    ("POST", "/v1/unshelve"): Rule(body=NAMES_BODY),
    ("POST", "/v1/instances/batch"): Rule(body=BATCH_BODY),
    ("POST", "/v1/tokens"): Rule(admin_only=True),
    ("GET", "/v1/tokens"): Rule(admin_only=True),
    ("DELETE", "/v1/tokens/{name}"): Rule(admin_only=True),
    # the dashboard (corral.control.dashboard): "/" takes ?token= and checks the session itself
    ("GET", "/"): Rule(public=True),
    ("GET", "/login"): Rule(public=True),
    ("POST", "/login"): Rule(public=True, body=FORM_BODY),
    ("POST", "/logout"): Rule(public=True, body=FORM_BODY),
    ("GET", "/ui/static/{file}"): Rule(public=True),
    ("GET", "/instances/{name}"): Rule(page=True),
    ("GET", "/hosts/{name}"): Rule(page=True),
    ("GET", "/ops"): Rule(page=True),
    ("GET", "/events"): Rule(page=True),
    ("POST", "/ui/act"): Rule(session_write=True, body=FORM_BODY),
}

#: paths every method of which is answered without a token (a 405 there needs none either)
PUBLIC_PATHS = frozenset(path for (_, path), rule in RULES.items() if rule.public)


def rule_for(method: str, path: str | None) -> Rule:
    return DEFAULT if path is None else RULES.get((method, path), DEFAULT)


def refusal(role: str, method: str, rule: Rule, params: Mapping[str, str],
            query: Mapping[str, str]) -> str | None:
    """Why a token with ``role`` may not make this call (None: it may)."""
    if role == "admin":
        return None
    if rule.admin_only:
        return "only an admin token may manage tokens"
    if role == "read-only":
        return None if method in READ_METHODS else "a read-only token may only read (GET)"
    if role == "host":
        if not rule.host:
            return "a host token may only fetch and upload image chunks and shelved disks"
        return rule.host_check(params, query) if rule.host_check is not None else None
    return f"unknown role {role!r}"
