"""The one exception tree of Tunery; the API maps it to HTTP in api/errors.py, the CLI to an exit.

TuneryError                      (status INTERNAL, HTTP 500)
├── InvalidArgument              (400 INVALID_ARGUMENT)  bad input a user can fix; also an
│                                 unknown API key (api.errors.InvalidApiKey, API_KEY_INVALID)
├── FailedPrecondition           (400 FAILED_PRECONDITION) e.g. model still training
├── Unauthenticated              (401 UNAUTHENTICATED)  no API key where one is needed
├── PermissionDenied             (403 PERMISSION_DENIED) a server's 403, in the HTTP client
├── NotFound                     (404 NOT_FOUND)
├── AlreadyExists                (409 ALREADY_EXISTS)
├── PayloadTooLarge              (413 INVALID_ARGUMENT)  request body over the limit
├── ResourceExhausted            (429 RESOURCE_EXHAUSTED) per-key job limit
└── Unavailable                  (503 UNAVAILABLE)
"""

from __future__ import annotations


class TuneryError(Exception):
    """Base of every error Tunery raises on purpose; `message` is shown to the user as is."""

    status = "INTERNAL"
    http_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(TuneryError):
    status = "INVALID_ARGUMENT"
    http_code = 400


class FailedPrecondition(TuneryError):
    status = "FAILED_PRECONDITION"
    http_code = 400


class Unauthenticated(TuneryError):
    status = "UNAUTHENTICATED"
    http_code = 401


class PermissionDenied(TuneryError):
    status = "PERMISSION_DENIED"
    http_code = 403


class NotFound(TuneryError):
    status = "NOT_FOUND"
    http_code = 404


class AlreadyExists(TuneryError):
    status = "ALREADY_EXISTS"
    http_code = 409


class PayloadTooLarge(TuneryError):
    status = "INVALID_ARGUMENT"
    http_code = 413


class ResourceExhausted(TuneryError):
    status = "RESOURCE_EXHAUSTED"
    http_code = 429


class Unavailable(TuneryError):
    status = "UNAVAILABLE"
    http_code = 503
