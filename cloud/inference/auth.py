"""Who may offload: a device or admin bearer token, resolved through a short-lived cache (`TokenCache`).

Theory: an inference request is tens of microseconds of work, and a token lookup is a database round trip (a
SQLite read is ~100 us, PostgreSQL over a network more), so the data plane asks the database once per token and
TTL, not once per request. The cache is keyed by the token's sha256 (the same hash the database keeps), so no
plain token is held in memory beyond the request that carried it. Refusals are cached too, so a client sending a
wrong token in a loop cannot turn each try into a query. The price of the TTL: a token revoked or expired is still
taken for up to `ttl_s` (5 s), which is the same window as a connection already open on it.

Roles (cloud/auth.py): "device" and "admin" may infer; an "enroll" token is refused with 403: it may only enroll.
Transports call `check(authorization_header)` and map `Unauthorized`/`Forbidden` to their own status codes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from edgefleet.cloud.auth import Principal, hash_token
from edgefleet.cloud.errors import CloudError, Forbidden, Unauthorized

# 5 s: a revoked token stops working within five seconds; under load the database sees one lookup per token per 5 s.
TOKEN_TTL_S = 5.0
# Bounds what clients sending random tokens can make us keep; cleared whole when full (a rare, cheap event).
MAX_CACHED_TOKENS = 10_000
_MISSING = ("offload inference needs a token: send 'Authorization: Bearer <token>' with a device token (from "
            "enrollment) or the admin token")


class TokenCache:
    """`check(header) -> Principal` for a device or admin token; `authenticate(token)` is the Fleet's."""

    def __init__(self, authenticate: Callable[[str], Principal], *, ttl_s: float = TOKEN_TTL_S) -> None:
        self._authenticate = authenticate
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Principal | CloudError]] = {}
        self._lock = threading.Lock()
        self.lookups = 0  # database lookups made (tests read it)

    def check(self, header: str | None) -> Principal:
        """The principal of an `Authorization: Bearer <token>` header; Unauthorized (401) or Forbidden (403)."""
        token = _bearer(header)
        key = hash_token(token)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is None or hit[0] < now:
            hit = (now + self.ttl_s, self._lookup(token))
            with self._lock:
                if len(self._cache) >= MAX_CACHED_TOKENS:
                    self._cache.clear()
                self._cache[key] = hit
        value = hit[1]
        if isinstance(value, CloudError):
            raise type(value)(value.message)
        return value

    def cached(self, header: str | None) -> Principal | None:
        """`check` when it needs no database lookup (the answer is cached, or the header is malformed), else None:
        an event loop calls `check` in a worker thread then."""
        token = _bearer(header)
        hit = self._cache.get(hash_token(token))
        if hit is None or hit[0] < time.monotonic():
            return None
        if isinstance(hit[1], CloudError):
            raise type(hit[1])(hit[1].message)
        return hit[1]

    def _lookup(self, token: str) -> Principal | CloudError:
        self.lookups += 1
        try:
            who = self._authenticate(token)
        except (Unauthorized, Forbidden) as exc:
            return exc
        if who.kind not in ("device", "admin"):
            return Forbidden(f"offload inference needs a device or admin token, not a {who.kind} token: an "
                             "enrollment token may only enroll; enroll the device and use its device token")
        return who

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


def _bearer(header: str | None) -> str:
    if not header:
        raise Unauthorized(_MISSING)
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be 'Bearer <token>' (a device token or the admin token)")
    return token


__all__ = ["TOKEN_TTL_S", "TokenCache"]
