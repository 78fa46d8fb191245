"""Bearer-token checks for the feedback/admin endpoints (and predict when configured), and request limits."""

from __future__ import annotations

import hmac
import os

TOKEN_ENV = "LENSMITH_API_TOKEN"


def configured_token() -> str | None:
    """The token from the environment; None (or empty) disables the protected endpoints entirely."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def bearer_from_header(authorization: str | None) -> str | None:
    """`Bearer abc` -> `abc`; anything else -> None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def token_matches(presented: str | None, expected: str) -> bool:
    # constant-time comparison: response time must not reveal how much of the token was right
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())
