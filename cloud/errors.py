"""The cloud's exception hierarchy. Services raise these; one FastAPI handler turns them into `ErrorBody` JSON.

    CloudError (500, "internal")
    ├── Invalid (422, "invalid")
    │   ├── ModelInvalid (422, "model_invalid")
    │   ├── UnknownClass (422, "unknown_class")
    │   └── Refused (422, "refused")   a device message outside the contract's limits or the cloud's record
    ├── TooLarge (413, "too_large")
    ├── Unauthorized (401, "unauthorized")
    ├── Forbidden (403, "forbidden")
    ├── NotFound (404, "not_found")
    ├── Conflict (409, "conflict")
    └── Unavailable (503, "unavailable")

Every message says what to do next. Library exceptions (SQLAlchemy, onnx, onnxruntime) are wrapped where they
enter our code; routes never raise HTTPException.
"""

from __future__ import annotations

from typing import Any


class CloudError(Exception):
    status_code = 500
    code = "internal"

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class Invalid(CloudError):
    status_code = 422
    code = "invalid"


class ModelInvalid(Invalid):
    code = "model_invalid"


class UnknownClass(Invalid):
    code = "unknown_class"


class Refused(Invalid):
    """A device's message was refused whole and counted (`refused_messages`); nothing of it was stored."""

    code = "refused"


class TooLarge(CloudError):
    status_code = 413
    code = "too_large"


class Unauthorized(CloudError):
    status_code = 401
    code = "unauthorized"


class Forbidden(CloudError):
    status_code = 403
    code = "forbidden"


class NotFound(CloudError):
    status_code = 404
    code = "not_found"


class Conflict(CloudError):
    status_code = 409
    code = "conflict"


class RateLimited(CloudError):
    """A device past its telemetry rate (cloud/ratelimit.py): try again later; nothing was stored."""

    status_code = 429
    code = "rate_limited"


class Unavailable(CloudError):
    status_code = 503
    code = "unavailable"
