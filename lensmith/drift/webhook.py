"""The drift alert webhook. Its URL is a secret (chat and incident webhooks carry their token in the path or
query): it is read from the environment variable named by drift.webhook_url_env (default
LENSMITH_DRIFT_WEBHOOK_URL), never from params.yaml, so it stays out of the params recorded in meta.json,
the reports, the Prefect run parameters and the logs. Whatever is logged or returned about a call shows the
URL as scheme://host only (`redact_url`, `redact_urls`).
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit

from lensmith.params import DriftParams

URL_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>]+""")


def webhook_url(params: DriftParams, environ: dict[str, str] | None = None) -> str | None:
    """The alert webhook URL from the environment variable drift.webhook_url_env; None when unset or empty."""
    if not params.webhook_url_env:
        return None
    value = (os.environ if environ is None else environ).get(params.webhook_url_env, "").strip()
    return value or None


def redact_url(url: str) -> str:
    """scheme://host[:port] of `url`, without user, password, path, query or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    if not parts.scheme or not host:
        return "<unparseable URL>"
    return f"{parts.scheme}://{host}{port}"


def redact_urls(text: str, secret: str | None = None) -> str:
    """`text` with every URL in it (and `secret` wherever it appears) shown as scheme://host only."""
    if secret:
        text = text.replace(secret, redact_url(secret))
    return URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def post_webhook(url: str, payload: dict[str, Any], timeout_s: float) -> str | None:
    """POST the alert as JSON; an error message (URLs redacted) instead of raising."""
    import httpx

    if urlsplit(url).scheme not in ("http", "https"):
        return f"the webhook URL ({redact_url(url)}) is not an http(s) URL"
    try:
        response = httpx.post(url, json=payload, timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        return redact_urls(f"{type(exc).__name__}: {exc}", url)
    return None
