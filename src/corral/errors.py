"""One error hierarchy for every process.

Every failure an operator can see carries a stable ``code`` (for scripts and the API), a
``retryable`` flag (so callers know whether trying again can help) and a ``hint`` that says what
to do. Errors cross process boundaries (agent -> NATS -> server -> HTTP -> CLI) as the dict from
:meth:`CorralError.to_dict` and are rebuilt with :func:`from_dict`, so the operator sees the
agent's own words, not a generic 500.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CorralError(Exception):
    """Base of every error corral reports to a person or a program."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        hint: str = "",
        retryable: bool | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.retryable = self.default_retryable if retryable is None else retryable
        self.details: dict[str, Any] = details or {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "retryable": self.retryable,
        }
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class InvalidRequest(CorralError):
    """Input that can never succeed as given."""

    code = "invalid_request"
    http_status = 422
    exit_code = 2


class Unauthorized(CorralError):
    code = "unauthorized"
    http_status = 401
    exit_code = 3


class Forbidden(Unauthorized):
    """A known token whose role does not allow the call (a read-only token on a write, a
    host's token off the image routes)."""

    code = "forbidden"
    http_status = 403


class NotFound(CorralError):
    code = "not_found"
    http_status = 404
    exit_code = 4


class PayloadTooLarge(InvalidRequest):
    """A request body larger than its route takes (``control/http/access.py``); refused
    before it is read whole."""

    code = "body_too_large"
    http_status = 413


class Conflict(CorralError):
    """The request clashes with what exists (a name taken, a busy instance)."""

    code = "conflict"
    http_status = 409
    exit_code = 5


class InvalidTransition(Conflict):
    """A lifecycle verb not allowed from the instance's current state."""

    code = "invalid_transition"


class NoCapacity(CorralError):
    """No host can take the request; ``details['shortfall']`` says what each host lacks."""

    code = "no_capacity"
    http_status = 409
    exit_code = 6
    default_retryable = True


class HostUnavailable(CorralError):
    """An agent did not answer in time or its host is down."""

    code = "host_unavailable"
    http_status = 503
    exit_code = 7
    default_retryable = True


class NotSupported(CorralError):
    """A driver lacks an optional verb (freeze on a driver without a freezer, say)."""

    code = "not_supported"
    http_status = 400
    exit_code = 8


class DriverError(CorralError):
    """A driver's tool (runc, the kernel) failed; the message carries its own words."""

    code = "driver_error"
    http_status = 502
    exit_code = 9


class ConfigError(CorralError):
    code = "config_error"
    http_status = 500
    exit_code = 10


class Busy(Conflict):
    """Another verb or operation holds the instance (or host); it names the holder."""

    code = "busy"
    default_retryable = True


class HookRefused(Conflict):
    """A ``pre-`` hook of an operation said no."""

    code = "hook_refused"


class MissingChunk(NotFound):
    code = "missing_chunk"


class CorruptChunk(CorralError):
    code = "corrupt_chunk"
    http_status = 500
    exit_code = 11


class OperationFailed(CorralError):
    """An operation ended without succeeding (rolled back, or needs attention)."""

    code = "operation_failed"
    http_status = 409
    exit_code = 12


class TransferFailed(CorralError):
    """A disk pass between hosts failed (rsync, btrfs send/receive, the data channel)."""

    code = "transfer_failed"
    http_status = 502
    exit_code = 13
    default_retryable = True


class HTTPError(CorralError):
    """A routing-level refusal from the web framework (405 and the like)."""

    code = "http_error"
    exit_code = 14


class NotLeader(CorralError):
    """This server does not lead the fleet (now): a follower with no leader to forward to,
    or a deposed leader whose write the database refused (its generation moved on). Another
    server leads within a lease; trying again then succeeds."""

    code = "not_leader"
    http_status = 503
    exit_code = 15
    default_retryable = True


_BY_CODE: dict[str, type[CorralError]] = {}


def _register(cls: type[CorralError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(CorralError)


def from_dict(data: dict[str, Any]) -> CorralError:
    """Rebuild an error sent over the wire; unknown codes become the base class."""
    cls = _BY_CODE.get(str(data.get("code", "")), CorralError)
    err = cls(
        str(data.get("message", "unknown error")),
        hint=str(data.get("hint", "")),
        retryable=bool(data.get("retryable", cls.default_retryable)),
        details=dict(data.get("details") or {}),
    )
    return err
