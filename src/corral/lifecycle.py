"""The instance lifecycle as data: states, verbs and the one function that moves between them.

Desired state (what the operator asked for) and observed state (what the agent last saw) are
separate fields on an instance; this table governs the *observed* state a verb may start from and
the state it leads to. Keeping it as a table means the CLI, the API and the error messages all
derive "what can I do now?" from the same place.
"""

from __future__ import annotations

from enum import StrEnum

from corral.errors import InvalidTransition


class State(StrEnum):
    PENDING = "pending"  # accepted by the server, not yet created on its host
    CREATED = "created"  # created on the host, never started
    RUNNING = "running"
    FROZEN = "frozen"
    STOPPED = "stopped"  # stopped by request
    EXITED = "exited"  # the workload ended by itself (exit code 0)
    FAILED = "failed"  # the workload crashed or was killed behind corral's back
    LOST = "lost"  # its host stopped answering; what runs there is unknown
    #: its disk is in the image store (and maybe still on its old host); no CPU or memory held
    SHELVED = "shelved"
    DELETED = "deleted"


class Verb(StrEnum):
    START = "start"
    STOP = "stop"
    KILL = "kill"
    RESTART = "restart"
    FREEZE = "freeze"
    THAW = "thaw"
    DELETE = "rm"
    SHELVE = "shelve"  # an operation (control/shelve.py), not a single agent call
    UNSHELVE = "unshelve"


TERMINAL: frozenset[State] = frozenset({State.DELETED})
#: States in which the workload's process exists on its host.
ALIVE: frozenset[State] = frozenset({State.RUNNING, State.FROZEN})
#: States that ended without being asked to.
ENDED: frozenset[State] = frozenset({State.EXITED, State.FAILED})

_STARTABLE = frozenset({State.CREATED, State.STOPPED, State.EXITED, State.FAILED})

#: verb -> (states it may start from, state it leads to)
VERBS: dict[Verb, tuple[frozenset[State], State]] = {
    Verb.START: (_STARTABLE, State.RUNNING),
    Verb.STOP: (frozenset({State.RUNNING, State.FROZEN}), State.STOPPED),
    Verb.KILL: (frozenset({State.RUNNING, State.FROZEN}), State.STOPPED),
    Verb.RESTART: (_STARTABLE | {State.RUNNING}, State.RUNNING),
    Verb.FREEZE: (frozenset({State.RUNNING}), State.FROZEN),
    Verb.THAW: (frozenset({State.FROZEN}), State.RUNNING),
    Verb.DELETE: (_STARTABLE | {State.PENDING, State.LOST, State.SHELVED}, State.DELETED),
    Verb.SHELVE: (_STARTABLE | {State.RUNNING}, State.SHELVED),
    Verb.UNSHELVE: (frozenset({State.SHELVED}), State.RUNNING),
}

#: state -> states reachable from it, by a verb or by an observation (exit, crash, host loss).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.CREATED, State.RUNNING, State.FAILED, State.DELETED}),
    State.CREATED: frozenset(
        {State.RUNNING, State.DELETED, State.FAILED, State.LOST, State.SHELVED}),
    State.RUNNING: frozenset(
        {State.RUNNING, State.FROZEN, State.STOPPED, State.EXITED, State.FAILED, State.LOST,
         State.SHELVED}
    ),
    State.FROZEN: frozenset({State.RUNNING, State.STOPPED, State.FAILED, State.LOST}),
    State.STOPPED: frozenset({State.RUNNING, State.DELETED, State.LOST, State.SHELVED}),
    State.EXITED: frozenset({State.RUNNING, State.DELETED, State.LOST, State.SHELVED}),
    State.FAILED: frozenset({State.RUNNING, State.DELETED, State.LOST, State.SHELVED}),
    State.LOST: frozenset(
        {State.RUNNING, State.FROZEN, State.STOPPED, State.EXITED, State.FAILED, State.DELETED}
    ),
    #: unshelve creates it again (created, then running if it was); rm forgets it
    State.SHELVED: frozenset({State.CREATED, State.RUNNING, State.DELETED}),
    State.DELETED: frozenset(),
}


#: states in which nothing of the instance runs: an operation may put it on a host in any of
#: them (a copy made elsewhere starts ``pending``/``created``; an undo puts back what was)
AT_REST: frozenset[State] = frozenset(
    {State.PENDING, State.CREATED, State.STOPPED, State.EXITED, State.FAILED})

#: states an operation may move an instance (and its disk) from: alive but not frozen by an
#: operator, or at rest on a host
MOVABLE: frozenset[State] = frozenset({State.RUNNING}) | (AT_REST - {State.PENDING})

#: moves only the server's own operations make, beyond :data:`TRANSITIONS` (which is also what
#: an agent's report may do): they re-create an instance, or undo that
OPERATION_MOVES: dict[State, frozenset[State]] = {
    **{s: AT_REST - {s} for s in AT_REST},
    State.LOST: frozenset({State.CREATED, State.STOPPED}),
}


def allowed_verbs(state: State) -> list[Verb]:
    """Verbs an operator may use on an instance in ``state``, in table order."""
    return [verb for verb, (sources, _) in VERBS.items() if state in sources]


def check_verb(name: str, state: State, verb: Verb) -> State:
    """Return the state ``verb`` leads to, or raise with the current state and what is allowed."""
    sources, target = VERBS[verb]
    if state not in sources:
        allowed = allowed_verbs(state)
        nexts = ", ".join(v.value for v in allowed) or "nothing"
        raise InvalidTransition(
            f"cannot {verb.value} instance '{name}': it is {state.value}",
            hint=f"from {state.value} you can: {nexts}",
            details={
                "state": state.value,
                "verb": verb.value,
                "allowed": [v.value for v in allowed],
            },
        )
    return target


def transition(name: str, current: State, new: State, *, operation: bool = False) -> State:
    """Move an observed state; refuse moves the table does not list (with ``operation``, the
    server's own moves of :data:`OPERATION_MOVES` too)."""
    if new == current and (operation or current in ALIVE | {State.STOPPED}):
        return new
    allowed = TRANSITIONS[current] | (OPERATION_MOVES.get(current, frozenset()) if operation
                                      else frozenset())
    if new not in allowed:
        raise InvalidTransition(
            f"instance '{name}' cannot go from {current.value} to {new.value}",
            hint="this is a bug in corral or a confused agent; run 'corral show' and report it",
            details={"state": current.value, "to": new.value},
        )
    return new
