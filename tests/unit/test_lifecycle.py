"""The lifecycle table: verbs, observed transitions, and the refusal that says what to do."""

from __future__ import annotations

import pytest

from corral.errors import InvalidTransition
from corral.lifecycle import (
    ALIVE,
    TERMINAL,
    TRANSITIONS,
    VERBS,
    State,
    Verb,
    allowed_verbs,
    check_verb,
    transition,
)


def test_every_state_has_a_row_and_terminal_states_lead_nowhere() -> None:
    assert set(TRANSITIONS) == set(State)
    for s in TERMINAL:
        assert TRANSITIONS[s] == frozenset()
        assert allowed_verbs(s) == []


def test_every_verb_target_is_reachable_from_each_of_its_sources() -> None:
    for verb, (sources, target) in VERBS.items():
        for s in sources:
            if s == target:
                continue
            assert target in TRANSITIONS[s], f"{verb}: {s} -> {target} not in the table"


@pytest.mark.parametrize(
    ("state", "verb", "target"),
    [
        (State.CREATED, Verb.START, State.RUNNING),
        (State.RUNNING, Verb.STOP, State.STOPPED),
        (State.FROZEN, Verb.STOP, State.STOPPED),
        (State.RUNNING, Verb.KILL, State.STOPPED),
        (State.RUNNING, Verb.FREEZE, State.FROZEN),
        (State.FROZEN, Verb.THAW, State.RUNNING),
        (State.FAILED, Verb.RESTART, State.RUNNING),
        (State.RUNNING, Verb.RESTART, State.RUNNING),
        (State.EXITED, Verb.START, State.RUNNING),
        (State.LOST, Verb.DELETE, State.DELETED),
        (State.STOPPED, Verb.DELETE, State.DELETED),
    ],
)
def test_allowed_verbs(state: State, verb: Verb, target: State) -> None:
    assert check_verb("x", state, verb) is target
    assert verb in allowed_verbs(state)


@pytest.mark.parametrize(
    ("state", "verb"),
    [
        (State.RUNNING, Verb.START),
        (State.RUNNING, Verb.DELETE),
        (State.STOPPED, Verb.FREEZE),
        (State.FROZEN, Verb.FREEZE),
        (State.RUNNING, Verb.THAW),
        (State.LOST, Verb.START),
        (State.FROZEN, Verb.RESTART),
        (State.DELETED, Verb.START),
    ],
)
def test_forbidden_verbs_say_state_and_what_is_allowed(state: State, verb: Verb) -> None:
    with pytest.raises(InvalidTransition) as info:
        check_verb("web", state, verb)
    err = info.value
    assert err.message == f"cannot {verb.value} instance 'web': it is {state.value}"
    assert err.details["state"] == state.value
    assert err.details["allowed"] == [v.value for v in allowed_verbs(state)]
    assert err.http_status == 409 and err.code == "invalid_transition"
    expected = ", ".join(err.details["allowed"]) or "nothing"
    assert err.hint == f"from {state.value} you can: {expected}"


def test_running_allows_exactly_these_verbs() -> None:
    assert [v.value for v in allowed_verbs(State.RUNNING)] == ["stop", "kill", "restart",
                                                                "freeze", "shelve"]
    assert [v.value for v in allowed_verbs(State.LOST)] == ["rm"]


def test_shelved_can_only_be_unshelved_or_removed() -> None:
    assert [v.value for v in allowed_verbs(State.SHELVED)] == ["rm", "unshelve"]
    for state in (State.RUNNING, State.STOPPED, State.CREATED, State.EXITED, State.FAILED):
        assert check_verb("x", state, Verb.SHELVE) is State.SHELVED
        assert transition("x", state, State.SHELVED) is State.SHELVED
    for state in (State.FROZEN, State.LOST, State.PENDING, State.SHELVED):
        with pytest.raises(InvalidTransition):
            check_verb("x", state, Verb.SHELVE)
    with pytest.raises(InvalidTransition) as info:
        check_verb("db", State.SHELVED, Verb.START)
    assert info.value.hint == "from shelved you can: rm, unshelve"
    # unshelve brings it back created (then running if it ran); a report never shelves it
    assert transition("x", State.SHELVED, State.CREATED) is State.CREATED
    with pytest.raises(InvalidTransition):
        transition("x", State.SHELVED, State.STOPPED)


def test_observed_transitions() -> None:
    assert transition("x", State.RUNNING, State.FAILED) is State.FAILED
    assert transition("x", State.RUNNING, State.RUNNING) is State.RUNNING
    assert transition("x", State.LOST, State.RUNNING) is State.RUNNING
    with pytest.raises(InvalidTransition) as info:
        transition("x", State.STOPPED, State.EXITED)
    assert info.value.details == {"state": "stopped", "to": "exited"}
    with pytest.raises(InvalidTransition):
        transition("x", State.DELETED, State.RUNNING)


def test_alive_states() -> None:
    assert frozenset({State.RUNNING, State.FROZEN}) == ALIVE


@pytest.mark.parametrize(
    ("state", "exit_code", "signal", "desired", "expected"),
    [
        ("running", None, None, "running", State.RUNNING),
        ("exited", 0, None, "running", State.EXITED),
        ("exited", 3, None, "running", State.FAILED),
        ("exited", None, 9, "running", State.FAILED),
        ("failed", 137, None, "running", State.FAILED),
        ("exited", None, 15, "stopped", State.STOPPED),  # it ended because we asked
        ("failed", 1, None, "stopped", State.STOPPED),
        ("stopped", None, None, "stopped", State.STOPPED),
        ("frozen", None, None, "frozen", State.FROZEN),
        ("martian", None, None, "running", State.FAILED),
    ],
)
def test_server_reading_of_agent_reports(state: str, exit_code: int | None, signal: int | None,
                                         desired: str, expected: State) -> None:
    from corral.bus.messages import InstanceReport
    from corral.control.fleet import observed

    report = InstanceReport(name="x", driver="process", state=state, exit_code=exit_code,
                            signal=signal)
    assert observed(report, desired) is expected


def test_operation_moves_are_the_servers_alone() -> None:
    """An operation re-creating an instance moves it between states at rest (stopped ->
    pending -> created); an agent's report may not: it would hide a real state change."""
    from corral.lifecycle import OPERATION_MOVES

    assert transition("a", State.STOPPED, State.PENDING, operation=True) == State.PENDING
    assert transition("a", State.LOST, State.CREATED, operation=True) == State.CREATED
    assert transition("a", State.SHELVED, State.SHELVED, operation=True) == State.SHELVED
    with pytest.raises(InvalidTransition):
        transition("a", State.STOPPED, State.PENDING)
    with pytest.raises(InvalidTransition):
        transition("a", State.SHELVED, State.SHELVED)
    # an operation still cannot bring back a deleted instance or invent a running one
    with pytest.raises(InvalidTransition):
        transition("a", State.DELETED, State.CREATED, operation=True)
    with pytest.raises(InvalidTransition):
        transition("a", State.SHELVED, State.FROZEN, operation=True)
    for src, dests in OPERATION_MOVES.items():
        assert State.RUNNING not in dests and State.FROZEN not in dests, src
