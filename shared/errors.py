"""Typed errors: one exception class per wire error code, and the mapping both ways."""

from __future__ import annotations

from zinfer.shared.message import Error
from zinfer.shared.models import DefinitionError, FieldProblem


class ZinferError(Exception):
    """An error a zinfer service answered with (or the client hit); `code` is the wire code."""

    code = "internal"

    def __init__(self, message: str, field: str | None = None, problems: list[FieldProblem] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.problems = list(problems or [])

    def __str__(self) -> str:
        if self.problems and len(self.problems) > 1:
            return "\n".join(str(p) for p in self.problems)
        if self.field and not self.message.startswith(self.field):
            return f"{self.field}: {self.message}"
        return self.message


class InvalidRequest(ZinferError, ValueError):
    code = "invalid"


class NotFound(ZinferError, KeyError):
    code = "not_found"

    __str__ = ZinferError.__str__


class Conflict(ZinferError):
    code = "conflict"


class InstanceNotReady(ZinferError):
    code = "state"


class TooLarge(ZinferError, ValueError):
    code = "too_large"


class Forbidden(ZinferError, PermissionError):
    """The caller's key does not have the role this request needs (or the request is not allowed at all)."""

    code = "forbidden"


class Unauthenticated(ZinferError, PermissionError):
    """No usable key, or the broker refused the key (unknown or revoked)."""

    code = "unauthenticated"


class Unavailable(ZinferError, ConnectionError):
    code = "unavailable"


class NoRoute(Unavailable):
    """Nothing serves the target (no such service, or no process holds that model uid now): the broker's own
    answer, told apart from a full queue by its code, never by its text."""

    code = "no_route"


class QueueFull(Unavailable):
    """Unavailable for now because a queue is full (an instance's, a peer's, the broker's): try again later.
    HTTP answers it 429."""

    code = "queue_full"


class RequestTimeout(ZinferError, TimeoutError):
    code = "timeout"


class StorageError(ZinferError, OSError):
    """The server could not write or read its own files (disk full, read-only home); the message says which."""

    code = "storage"


class Cancelled(ZinferError):
    code = "cancelled"


class ProtocolError(ZinferError):
    code = "protocol"


class InternalError(ZinferError):
    code = "internal"


_BY_CODE = {cls.code: cls for cls in (InvalidRequest, NotFound, Conflict, InstanceNotReady, TooLarge, Forbidden,
                                       Unauthenticated, Unavailable, NoRoute, QueueFull, RequestTimeout, StorageError,
                                       Cancelled, ProtocolError, InternalError)}


def error_class(code: str) -> type[ZinferError]:
    return _BY_CODE.get(code, InternalError)


def error_from_reply(reply: Error) -> ZinferError:
    return error_class(reply.code)(reply.message, reply.field, reply.problems)


def storage_error(action: str, path, exc: OSError, field: str | None = None) -> StorageError:
    """An OSError of the server's own files as a typed error naming the path and the cause."""
    import errno

    cause = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
             errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exceeded"}.get(
        exc.errno, exc.strerror or type(exc).__name__)
    return StorageError(f"cannot {action} {path}: {cause}", field=field)


def reply_from_exception(exc: BaseException) -> Error:
    if isinstance(exc, ZinferError):
        return Error(code=exc.code, message=exc.message, field=exc.field, problems=exc.problems)
    if isinstance(exc, DefinitionError):
        first = exc.problems[0] if exc.problems else None
        return Error(code="invalid", message=str(exc), field=first.field if first else None,
                     problems=exc.problems)
    return Error(code="internal", message=f"{type(exc).__name__}: {exc}")
