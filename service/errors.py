"""Errors of the service itself, in the same hierarchy as the science core's (core.errors).

Pure Python, so the gateway and the worker share them; ``app.problems`` turns every
:class:`~core.errors.ScsnetError` into problem+json in one place, and a failed job stores
``problem()`` of the same classes.
"""

from __future__ import annotations

import errno

from core.errors import InputError, ScsnetError


class Unauthorized(ScsnetError):
    type_slug = "unauthorized"
    title = "Missing or invalid API key"
    status = 401


class NotFound(ScsnetError):
    type_slug = "not-found"
    title = "No such resource"
    status = 404


class MethodNotAllowed(ScsnetError):
    type_slug = "method-not-allowed"
    title = "Method not allowed on this resource"
    status = 405


class InvalidRequest(ScsnetError):
    type_slug = "invalid-request"
    title = "The request is malformed"
    status = 422


class InvalidCursor(ScsnetError):
    """A list cursor the service did not hand out (opaque: nothing to correct, start again)."""

    type_slug = "invalid-cursor"
    title = "The list cursor is not valid"
    status = 400


class MalformedUpload(ScsnetError):
    type_slug = "malformed-upload"
    title = "The upload is not a well-formed multipart form"
    status = 400


class UploadTooLarge(InputError):
    type_slug = "upload-too-large"
    title = "The upload is too large"
    status = 413


class InvalidCallbackUrl(ScsnetError):
    type_slug = "invalid-callback-url"
    title = "The callback URL is not acceptable"
    status = 422


class IdempotencyKeyReused(ScsnetError):
    type_slug = "idempotency-key-reused"
    title = "The idempotency key was already used for a different request"
    status = 422


class IdempotencyKeyInUse(ScsnetError):
    type_slug = "idempotency-key-in-use"
    title = "A request with this idempotency key is still being received"
    status = 409


class JobNotFinished(ScsnetError):
    type_slug = "job-not-finished"
    title = "The job has no results (yet)"
    status = 409


class ArtifactUnavailable(ScsnetError):
    type_slug = "artifact-unavailable"
    title = "This job has no such output"
    status = 404


class NotReady(ScsnetError):
    type_slug = "not-ready"
    title = "The service is not ready"
    status = 503


class AnalysisTimedOut(ScsnetError):
    type_slug = "analysis-timed-out"
    title = "The analysis took too long"
    status = 503


class StorageUnavailable(ScsnetError):
    type_slug = "storage-unavailable"
    title = "The service cannot write to its storage"
    status = 503


_STORAGE_FAULTS = {
    errno.ENOSPC: "is full",
    errno.EDQUOT: "is over its quota",
    errno.EROFS: "is read-only",
    errno.EACCES: "is not writable by the service (permission denied)",
    errno.EPERM: "is not writable by the service (operation not permitted)",
    errno.EIO: "failed with an I/O error",
}


def storage_error(exc: BaseException) -> StorageUnavailable | None:
    """The problem for an ``OSError`` saying the service's own disk is full, read-only, not
    writable or failing (the operator's trouble, not the client's); None for anything else."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_FAULTS:
        return StorageUnavailable(
            f"the service's storage {_STORAGE_FAULTS[exc.errno]}; nothing was kept; try again once an operator has fixed it"
        )
    return None


class InternalError(ScsnetError):
    """A bug in scsnet (gateway or worker), logged with its traceback; the client sees only
    this problem."""

    type_slug = "internal-error"
    title = "Internal error"
    status = 500
