"""Base-model routes, health and OpenAPI on a live server, under /v1beta and /v1."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from tunery.api.app import create_app
from tunery.settings import Settings


@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_list_models_shows_base_models_with_gemini_fields(http: httpx.Client, version: str) -> None:
    r = http.get(f"/{version}/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert {"models/gemma-3-270m", "models/tiny-gemma"} <= models.keys()
    gemma = models["models/gemma-3-270m"]
    assert gemma["supportedGenerationMethods"] == [
        "generateContent",
        "countTokens",
        "createTunedModel",
    ]
    assert gemma["baseModelId"] == "gemma-3-270m"
    for field in ("version", "displayName", "description", "inputTokenLimit", "outputTokenLimit"):
        assert field in gemma
    assert {"temperature", "topP", "topK"} <= gemma.keys()
    assert "nextPageToken" not in r.json()


def test_list_models_pages_with_next_page_token(http: httpx.Client) -> None:
    first = http.get("/v1beta/models", params={"pageSize": 1}).json()
    assert len(first["models"]) == 1
    second = http.get(
        "/v1beta/models", params={"pageSize": 1, "pageToken": first["nextPageToken"]}
    ).json()
    assert len(second["models"]) == 1
    assert second["models"][0]["name"] != first["models"][0]["name"]
    assert "nextPageToken" not in second


def test_get_model_returns_one_model(http: httpx.Client) -> None:
    r = http.get("/v1beta/models/tiny-gemma")
    assert r.status_code == 200
    assert r.json()["name"] == "models/tiny-gemma"


def test_get_unknown_model_is_404_envelope(http: httpx.Client) -> None:
    r = http.get("/v1beta/models/nope")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == 404
    assert error["status"] == "NOT_FOUND"
    assert error["message"].startswith("models/nope is not found for API version v1beta")


def test_bad_page_token_is_400(http: httpx.Client) -> None:
    r = http.get("/v1beta/models", params={"pageToken": "garbage"})
    assert r.status_code == 400
    assert r.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_healthz_and_openapi_are_served(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    paths = http.get("/openapi.json").json()["paths"]
    assert "/v1beta/tunedModels/{model_id}:generateContent" in paths
    assert "/v1beta/models" in paths


def test_readyz_is_ready_at_once_without_preload(http: httpx.Client) -> None:
    r = http.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "models": []}


def test_readyz_says_when_the_preloaded_base_model_is_in(settings: Settings) -> None:
    # /healthz answers while the model loads in the background; /readyz turns 200 once it is in,
    # and the Generator is built (the first request pays nothing).
    app = create_app(settings, preload=["tiny-gemma"])
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        deadline = time.monotonic() + 60
        while (r := client.get("/readyz")).status_code == 503:
            assert r.json()["status"] == "loading"
            assert time.monotonic() < deadline, "the preload did not finish"
            time.sleep(0.05)
        assert r.json() == {"status": "ready", "models": ["tiny-gemma"]}
        assert app.state.services.inference.is_loaded("models/tiny-gemma")


def test_readyz_reports_a_failed_preload_and_the_server_still_serves(settings: Settings) -> None:
    app = create_app(settings, preload=["no-such-model"])
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while (r := client.get("/readyz")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.status_code == 503
        assert r.json()["status"] == "failed"
        assert "no-such-model" in r.json()["error"]
        assert client.get("/v1beta/models/tiny-gemma").status_code == 200
