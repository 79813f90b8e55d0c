"""One error shape: codes, statuses, exit codes, and the round trip over the wire."""

from __future__ import annotations

import pytest

from corral import errors
from corral.errors import CorralError, from_dict


def _all() -> list[type[CorralError]]:
    out: list[type[CorralError]] = []
    todo: list[type[CorralError]] = [CorralError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def test_codes_are_unique_and_stable() -> None:
    codes = [c.code for c in _all() if c.__module__ == "corral.errors"]
    assert len(codes) == len(set(codes))
    assert errors.NoCapacity.code == "no_capacity" and errors.NoCapacity.http_status == 409
    assert errors.Unauthorized.http_status == 401
    assert errors.InvalidRequest.http_status == 422
    assert errors.HostUnavailable.http_status == 503


def test_exit_codes_differ_between_kinds() -> None:
    """Each kind (a direct subclass of the base) has its own exit code; a refinement of a
    kind (Busy is a Conflict) shares its kind's."""
    kinds = [c for c in CorralError.__subclasses__() if c.__module__ == "corral.errors"]
    exit_codes = [c.exit_code for c in kinds]
    assert len(exit_codes) == len(set(exit_codes))
    for c in _all():
        if c is not CorralError and c not in kinds:
            kind = next((k for k in kinds if issubclass(c, k)), CorralError)
            assert c.exit_code == kind.exit_code, c


def test_every_error_of_every_module_lives_in_errors_py() -> None:
    """An error code defined elsewhere is unknown to a process that never imports its module:
    the server turned an agent's ``transfer_failed`` into a 500 ``internal``. So every module is
    imported and every class with a code of its own must be defined in (and registered by)
    corral.errors."""
    import importlib
    import pkgutil

    import corral

    for mod in pkgutil.walk_packages(corral.__path__, "corral."):
        if mod.name.endswith("__main__") or ".migrations" in mod.name:
            continue
        importlib.import_module(mod.name)
    # a class elsewhere may refine one for local use (a transport error with its bare
    # reason), but never with a code of its own: that code would be unknown elsewhere
    outside = [f"{c.__module__}.{c.__qualname__}" for c in _all()
               if c.__module__ != "corral.errors" and "code" in vars(c)]
    assert not outside, f"define these in corral/errors.py: {outside}"
    for c in _all():
        if c.__module__ == "corral.errors":
            assert errors._BY_CODE[c.code] is c


@pytest.mark.parametrize("cls", [c for c in _all() if c.__module__ == "corral.errors"])
def test_round_trip_keeps_class_and_fields(cls: type[CorralError]) -> None:
    err = cls("boom", hint="do this", details={"a": 1})
    back = from_dict(err.to_dict())
    assert type(back) is cls
    assert (back.message, back.hint, back.retryable, back.details) == (
        "boom", "do this", err.retryable, {"a": 1})


def test_shape_and_defaults() -> None:
    err = errors.NoCapacity("no room", hint="add a host")
    assert err.to_dict() == {"code": "no_capacity", "message": "no room", "hint": "add a host",
                             "retryable": True}
    assert str(err) == "no room (add a host)"
    assert str(errors.NotFound("gone")) == "gone"
    assert errors.NotFound("x", retryable=True).retryable is True


def test_unknown_code_becomes_the_base_class() -> None:
    err = from_dict({"code": "from_the_future", "message": "hm"})
    assert type(err) is CorralError and err.message == "hm"
    assert from_dict({}).message == "unknown error"
