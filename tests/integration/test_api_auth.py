"""API keys: header or ?key=, 401 without one, 400 API_KEY_INVALID for a wrong one, and each key
sees only its own tuned models (another key's model is 404, as if it did not exist)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest import KEY_A, KEY_B
from live_server import LiveServer

BODY = {
    "baseModel": "models/tiny-gemma",
    "tuningTask": {"trainingData": {"examples": {"examples": [{"textInput": "1", "output": "2"}]}}},
}


@pytest.fixture
def client(keyed_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=keyed_server.url, timeout=60) as c:
        yield c


def test_missing_key_is_401_unauthenticated(client: httpx.Client) -> None:
    r = client.get("/v1beta/models")
    assert r.status_code == 401
    assert r.json()["error"]["status"] == "UNAUTHENTICATED"


def test_unknown_key_is_400_api_key_invalid(client: httpx.Client) -> None:
    r = client.get("/v1beta/models", headers={"x-goog-api-key": "wrong"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["message"] == "API key not valid. Please pass a valid API key."
    assert error["details"][0]["reason"] == "API_KEY_INVALID"


def test_key_in_header_or_query_is_accepted(client: httpx.Client) -> None:
    assert client.get("/v1beta/models", headers={"x-goog-api-key": KEY_A}).status_code == 200
    assert client.get("/v1beta/models", params={"key": KEY_B}).status_code == 200


def test_health_needs_no_key(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200


def test_each_key_sees_only_its_own_tuned_models(client: httpx.Client) -> None:
    a = {"x-goog-api-key": KEY_A}
    b = {"x-goog-api-key": KEY_B}
    name = client.post("/v1beta/tunedModels", json=BODY, headers=a).json()["metadata"]["tunedModel"]
    assert client.get(f"/v1beta/{name}", headers=a).status_code == 200
    assert client.get(f"/v1beta/{name}", headers=b).status_code == 404
    assert client.get("/v1beta/tunedModels", headers=b).json().get("tunedModels", []) == []
    assert client.delete(f"/v1beta/{name}", headers=b).status_code == 404
    body = {"contents": [{"parts": [{"text": "1"}]}]}
    r = client.post(f"/v1beta/{name}:generateContent", json=body, headers=b)
    assert r.status_code == 404
    assert [
        m["name"] for m in client.get("/v1beta/tunedModels", headers=a).json()["tunedModels"]
    ] == [name]
