"""The drift webhook URL is a secret (#16): read from the environment, refused in params.yaml, never echoed
in params errors, params dumps (meta.json, reports) or webhook error messages (scheme://host only)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from lensmith.cli import app
from lensmith.drift.webhook import post_webhook, redact_url, redact_urls, webhook_url
from lensmith.errors import ParamsError
from lensmith.params import DriftParams, load_params, params_from_dict

SECRET_URL = "https://bot:pa55@hooks.example.com:8443/services/T000/B000/s3cr3t-token?sig=abc"


def test_a_literal_webhook_url_in_params_yaml_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"drift": {"webhook_url": SECRET_URL}}))
    with pytest.raises(ParamsError, match="LENSMITH_DRIFT_WEBHOOK_URL") as info:
        load_params(path)
    assert "s3cr3t" not in str(info.value) and "environment variable" in str(info.value)
    result = CliRunner().invoke(app, ["check-params", "--params", str(path)])
    assert result.exit_code == 2 and "drift.webhook_url" in result.output and "s3cr3t" not in result.output
    with pytest.raises(ParamsError, match="webhook_url_env"):
        params_from_dict({"drift": {"webhook_url_env": SECRET_URL}})  # the URL where the variable's name goes


def test_an_old_null_webhook_url_still_loads() -> None:
    assert params_from_dict({"drift": {"webhook_url": None}}).drift.webhook_url_env == "LENSMITH_DRIFT_WEBHOOK_URL"


def test_the_url_comes_from_the_environment_and_stays_out_of_the_params(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENSMITH_DRIFT_WEBHOOK_URL", SECRET_URL)
    params = params_from_dict({})
    assert webhook_url(params.drift) == SECRET_URL
    assert "s3cr3t" not in json.dumps(params.model_dump(mode="json"))  # what meta.json and the reports record
    assert webhook_url(DriftParams(webhook_url_env="OTHER_VAR"), {"OTHER_VAR": " "}) is None
    assert webhook_url(DriftParams(webhook_url_env=None)) is None


def test_redaction_keeps_scheme_and_host_only() -> None:
    assert redact_url(SECRET_URL) == "https://hooks.example.com:8443"
    text = redact_urls(f"Client error '404 Not Found' for url '{SECRET_URL}'")
    assert "s3cr3t" not in text and "pa55" not in text and "https://hooks.example.com:8443" in text


def test_a_failed_webhook_call_reports_without_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(url: str, **kwargs: object) -> httpx.Response:
        return httpx.Response(404, request=httpx.Request("POST", url))

    monkeypatch.setattr(httpx, "post", not_found)
    error = post_webhook(SECRET_URL, {"event": "x"}, 1.0)
    assert error and "404" in error and "hooks.example.com" in error and "s3cr3t" not in error and "pa55" not in error
    refused = post_webhook("file:///etc/s3cr3t", {}, 1.0)
    assert refused and "not an http(s) URL" in refused and "s3cr3t" not in refused
