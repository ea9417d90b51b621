"""Bearer tokens: made with `secrets`, stored as sha256 hashes, resolved to a `Principal`.

Theory: three kinds of token. The admin token is made once, at the first start of a fresh database, shown once and
written to `{data_dir}/admin.token` (0600) for the operator; enrollment tokens are made by an admin, expire, and may
enroll many devices; a device token is issued at enrollment and names its device. Only the sha256 of a token is
stored: a copy of the database does not let anyone act as a device or an admin. sha256 (not a slow password hash)
is right here because the tokens are 256-bit random strings, not guessable passwords.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from edgefleet.cloud.errors import CloudError, Unauthorized
from edgefleet.cloud.store import Store
from edgefleet.common.fsutil import atomic_write_text

TokenKind = Literal["admin", "enroll", "device"]
# 32 bytes = 256 bits of randomness, the secrets module's recommendation for tokens.
TOKEN_BYTES = 32
# Readable prefixes tell an operator (and a secret scanner) what a leaked string is.
PREFIX: dict[str, str] = {"admin": "efa_", "enroll": "efe_", "device": "efd_"}


@dataclass(frozen=True)
class Principal:
    kind: TokenKind
    device_id: str | None = None
    token_hash: str | None = None  # which token: enrollment records it on the device

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"


def new_token(kind: TokenKind) -> str:
    return PREFIX[kind] + secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def ensure_admin_token(store: Store, token_file: Path) -> str | None:
    """Make the admin token on a fresh database; return it once (and write it to `token_file`), else None."""
    token = new_token("admin")
    if not store.add_admin_token_once(hash_token(token), datetime.now(timezone.utc)):
        return None
    try:
        atomic_write_text(token_file, token + "\n", 0o600)  # 0600 from its first byte
    except OSError as exc:
        raise CloudError(f"admin token made but not written to {token_file}: {exc}; it is: {token}") from None
    return token


def issue_token(store: Store, kind: TokenKind, *, device_id: str | None = None, ttl_s: int | None = None,
                note: str = "") -> tuple[str, datetime | None]:
    now = datetime.now(timezone.utc)
    expires_at = now + timedelta(seconds=ttl_s) if ttl_s is not None else None
    token = new_token(kind)
    store.add_token(hash_token(token), kind, device_id=device_id, expires_at=expires_at, note=note, now=now)
    return token, expires_at


def authenticate(store: Store, token: str | None) -> Principal:
    if not token or not token.strip():
        raise Unauthorized(
            "missing bearer token: pass Authorization: Bearer <token>; the admin token was written to "
            "admin.token in the cloud's data directory at first start"
        )
    row = store.find_token(hash_token(token.strip()))
    # compare_digest on the hash we looked up: the lookup is by hash, so timing reveals nothing about the token.
    if row is None or not hmac.compare_digest(row.token_hash, hash_token(token.strip())):
        raise Unauthorized(
            "unknown or revoked token: check it was copied whole (the admin token is in admin.token in the cloud's "
            "data directory; a device gets a new token by enrolling again)"
        )
    if row.expires_at is not None and row.expires_at <= datetime.now(timezone.utc):
        raise Unauthorized(
            f"token expired at {row.expires_at.isoformat()}: ask an admin for a new one "
            "(fleet tokens create)"
        )
    return Principal(kind=row.kind, device_id=row.device_id, token_hash=row.token_hash)  # type: ignore[arg-type]


__all__ = ["Principal", "authenticate", "ensure_admin_token", "hash_token", "issue_token", "new_token"]
