"""API tokens and roles (issue 10, item 1): the token store keeps only hashes and finds a
token by its public key id, the guard's table gives each role exactly its routes, and the
names the API takes are checked by one set of patterns."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.orm import sessionmaker

from corral.api import names
from corral.control.db import ApiToken, migrate
from corral.control.http import access
from corral.control.tokens import FLEET, Principal, TokenStore
from corral.errors import Conflict, InvalidRequest


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    """A store on a database made by the migrations (0007 makes the table)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'corral.db'}")
    migrate(engine)
    assert "api_tokens" in inspect(engine).get_table_names()
    return TokenStore(sessionmaker(engine, expire_on_commit=False))


def stored(store: TokenStore) -> list[ApiToken]:
    with store.sessions() as s:
        return list(s.scalars(select(ApiToken)))


def test_create_resolve_revoke_list(store: TokenStore) -> None:
    ro = store.create("grafana", "read-only")
    host = store.create("host1", "host")
    assert ro != host and ro.startswith("corral_") and len(ro) > 60
    assert store.resolve(ro) == Principal("grafana", "read-only")
    assert store.resolve(host) == Principal("host1", "host")
    assert [(t.name, t.role) for t in store.list()] == [("grafana", "read-only"),
                                                        ("host1", "host")]
    assert store.revoke("grafana") is True
    assert store.resolve(ro) is None
    assert store.revoke("grafana") is False
    assert store.resolve(host) == Principal("host1", "host")


def test_only_a_hash_is_kept(store: TokenStore) -> None:
    token = store.create("ci", "admin")
    (row,) = stored(store)
    assert row.secret_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert token not in {row.name, row.key_id, row.secret_sha256, row.role}
    assert token.split("_")[1] == row.key_id  # the public part finds the row
    assert "token" not in store.list()[0].model_dump()


def test_wrong_and_malformed_tokens_resolve_to_nobody(store: TokenStore) -> None:
    token = store.create("ci", "admin")
    key_id = token.split("_")[1]
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    other_key = "corral_" + "0" * 16 + token[len("corral_") + 16:]
    for bad in (flipped, other_key, f"corral_{key_id}_", f"corral_{key_id}", "corral_",
                "", "Bearer " + token, token + "x", token.upper(), "x" * 10_000):
        assert store.resolve(bad) is None, bad


@pytest.mark.parametrize("name", ["", "a b", "../x", "a/b", "a\nb", "ünï", "-x", ".x",
                                  "a" * 65, "a\x00"])
def test_bad_names_are_refused_and_nothing_is_stored(store: TokenStore, name: str) -> None:
    with pytest.raises(InvalidRequest):
        store.create(name, "admin")
    assert stored(store) == []


def test_refusals(store: TokenStore) -> None:
    with pytest.raises(InvalidRequest, match="fleet token"):
        store.create(FLEET, "admin")
    with pytest.raises(InvalidRequest, match="unknown role"):
        store.create("x", "root")  # type: ignore[arg-type]
    store.create("x", "host")
    with pytest.raises(Conflict, match="exists"):
        store.create("x", "admin")
    assert [(t.name, t.role) for t in store.list()] == [("x", "host")]


def test_each_role_gets_exactly_its_routes() -> None:
    def may(role: str, method: str, path: str, params: dict[str, str] | None = None,
            query: dict[str, str] | None = None) -> bool:
        rule = access.rule_for(method, path)
        return access.refusal(role, method, rule, params or {}, query or {}) is None

    assert may("admin", "DELETE", "/v1/instances/{name}")
    assert may("admin", "POST", "/v1/tokens")
    assert may("read-only", "GET", "/v1/instances")
    assert may("read-only", "GET", "/metrics")
    assert not may("read-only", "POST", "/v1/instances/{name}/{verb}")
    assert not may("read-only", "DELETE", "/v1/images/{name}")
    assert not may("read-only", "GET", "/v1/tokens")
    assert not may("host", "GET", "/v1/instances")
    assert not may("host", "POST", "/v1/images/gc")
    for method, path in (("GET", "/v1/images/{name}/manifest"), ("POST", "/v1/chunks/missing"),
                         ("POST", "/v1/chunks/fetch"), ("POST", "/v1/chunks/upload")):
        assert may("host", method, path)
    assert may("host", "PUT", "/v1/images/{name}", {"name": "@shelf-web-0a1b2c3d"})
    assert not may("host", "PUT", "/v1/images/{name}", {"name": "base"})
    assert not may("host", "PUT", "/v1/images/{name}", {"name": "@shelf-web-1"},
                   {"replace": "true"})
    assert not may("nobody", "GET", "/v1/instances")


def test_every_body_has_a_cap_and_uploads_fit_theirs() -> None:
    from corral.images.records import MAX_BATCH, MAX_UPLOAD_BYTES

    assert access.DEFAULT.body == 64 * 1024
    assert access.rule_for("POST", "/v1/chunks/upload").body == MAX_UPLOAD_BYTES
    ids = '{"ids": [' + ", ".join(['"' + "ab" * 32 + '"'] * MAX_BATCH) + "]}"
    assert len(ids) < access.rule_for("POST", "/v1/chunks/missing").body
    assert all(rule.body > 0 for rule in access.RULES.values())


@pytest.mark.parametrize(("kind", "good", "bad"), [
    ("instance", ["web", "a", "db-1", "x" * 63], ["Web", "-a", "a-", "a_b", "x" * 64, "a\n"]),
    ("host", ["host1", "Host_A", "h-2"], ["h.1", "h 1", "h/1", "h\n", "ü", "h" * 64]),
    ("image", ["base", "base-1.2:latest", "@shelf-web-0a1b2c3d"], ["..", ".x", "a/b", "a\n",
                                                                   "a" * 201, "ü", "@@x"]),
    ("token", ["ci", "Host_1.ci-deploy"], ["", "a b", "a" * 65, "ci\n"]),
])
def test_name_patterns(kind: str, good: list[str], bad: list[str]) -> None:
    for name in good:
        assert names.check(kind, name) == name
    for name in bad:
        with pytest.raises(ValueError, match=f"{kind} name"):
            names.check(kind, name)


def test_the_image_routes_take_the_same_image_names() -> None:
    """images/ may not import api/ (the layers test), so it keeps a copy of the pattern."""
    from corral.images import http as image_http

    assert image_http.NAME_PATTERN == names.IMAGE_PATTERN
    assert re.fullmatch(names.IMAGE_PATTERN.strip("^$"), "../x") is None


def test_path_problems() -> None:
    assert names.path_problem("/srv/root") is None
    assert "'..'" in str(names.path_problem("/srv/../etc"))
    assert names.path_problem("../rootfs", dotdot=True) is None
    assert "NUL" in str(names.path_problem("/a\x00b"))
    assert "control" in str(names.path_problem("/a\nb"))
    assert "longer" in str(names.path_problem("/" + "a" * 5000))

