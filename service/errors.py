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


class TooManyFailedAttempts(ScsnetError):
    """Too many requests with a wrong or missing API key from one client address (app.throttle);
    answered with ``Retry-After``. A valid key is still accepted from that address."""

    type_slug = "too-many-failed-attempts"
    title = "Too many failed authentication attempts from this address"
    status = 429

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class RequestTimeout(ScsnetError):
    """The request body stalled longer than the gateway waits between two of its pieces."""

    type_slug = "request-timeout"
    title = "The request body arrived too slowly"
    status = 408


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


class UnsupportedMediaType(ScsnetError):
    """The request's Content-Type is not one the route takes (STOW-RS wants multipart/related
    with type="application/dicom")."""

    type_slug = "unsupported-media-type"
    title = "The request body's media type is not accepted here"
    status = 415


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


class NothingToDeliver(ScsnetError):
    """A delivery was asked for that cannot be made: the job did not succeed, has no DICOM
    results, or its tenant has no DICOMweb destination."""

    type_slug = "nothing-to-deliver"
    title = "There is nothing to deliver"
    status = 409


class ArtifactUnavailable(ScsnetError):
    type_slug = "artifact-unavailable"
    title = "This job has no such output"
    status = 404


class FilesDeleted(ScsnetError):
    """The job's files were deleted (the retention period ran out, or its inputs after a cancel)."""

    type_slug = "files-deleted"
    title = "The job's files have been deleted"
    status = 410


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


class SchemaOutdated(Exception):
    """The job store's schema is not the one this scsnet needs (older: ``scsnet db upgrade``;
    newer: a newer scsnet). Raised when a process opens the store, never inside a request:
    a start-up refusal for the operator, told in one line by the command line, not a problem
    object for a client."""
