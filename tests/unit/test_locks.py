"""The one lock manager: all-or-nothing takes, shared and exclusive holds, refusals that name
the holder, release that frees exactly what was held."""

from __future__ import annotations

import pytest

from corral.errors import Busy
from corral.ops.locks import LockManager, LockSet, host, instance


def test_an_exclusive_hold_refuses_others_and_names_its_holder() -> None:
    locks = LockManager()
    locks.take("op:1", LockSet.of([instance("web")]), "operation 1 (migrate)")
    with pytest.raises(Busy) as err:
        locks.take("verb:stop", LockSet.of([instance("web")]))
    assert "instance 'web' is busy with operation 1 (migrate)" in err.value.message
    assert err.value.retryable and err.value.details["holder"] == "op:1"
    assert "web" in locks.instances and "db" not in locks.instances
    locks.release("op:1")
    locks.take("verb:stop", LockSet.of([instance("web")]))


def test_shared_holds_coexist_but_keep_an_exclusive_one_out() -> None:
    locks = LockManager()
    locks.take("op:a", LockSet.of([instance("a")], [host("h1"), host("h2")]))
    locks.take("op:b", LockSet.of([instance("b")], [host("h1")]))
    with pytest.raises(Busy):
        locks.take("rm:h1", LockSet.of([host("h1")]))
    locks.release("op:a")
    with pytest.raises(Busy):  # op:b still shares h1
        locks.take("rm:h1", LockSet.of([host("h1")]))
    locks.take("rm:h2", LockSet.of([host("h2")]))  # nobody shares h2 any more
    locks.release("op:b")
    locks.take("rm:h1", LockSet.of([host("h1")]))


def test_a_refused_take_holds_nothing() -> None:
    locks = LockManager()
    locks.take("op:1", LockSet.of([instance("b")]))
    with pytest.raises(Busy):
        locks.take("op:2", LockSet.of([instance("a"), instance("b")], [host("h1")]))
    assert "a" not in locks.instances and not locks.busy(host("h1"))
    assert locks.holder(instance("b")) == "op:1"


def test_release_is_idempotent_and_an_owner_may_add_to_what_it_holds() -> None:
    locks = LockManager()
    locks.take("op:1", LockSet.of([instance("a")]))
    locks.take("op:1", LockSet.of([instance("a"), instance("b")]))  # its own again: fine
    assert set(locks.instances) == {"a", "b"}
    locks.release("op:1")
    locks.release("op:1")
    assert not locks.instances


def test_holding_releases_even_when_the_body_fails() -> None:
    locks = LockManager()
    with pytest.raises(RuntimeError), locks.holding("verb:x", LockSet.of([instance("a")])):
        raise RuntimeError("boom")
    assert "a" not in locks.instances
