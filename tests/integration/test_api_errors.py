"""Every failure has the Gemini envelope: bad JSON, wrong types, unknown routes, big bodies."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from tunery.api.app import create_app
from tunery.settings import Settings

GENERATE = "/v1beta/models/tiny-gemma:generateContent"


def error_of(r: httpx.Response, code: int, status: str) -> str:
    assert r.status_code == code, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["status"] == status
    return str(body["error"]["message"])


def test_malformed_json_is_400_invalid_argument(http: httpx.Client) -> None:
    r = http.post(GENERATE, content=b'{"contents": [', headers={"content-type": "application/json"})
    assert "Invalid JSON payload" in error_of(r, 400, "INVALID_ARGUMENT")


def test_empty_body_is_400(http: httpx.Client) -> None:
    r = http.post("/v1beta/tunedModels", headers={"content-type": "application/json"})
    error_of(r, 400, "INVALID_ARGUMENT")


def test_wrong_type_names_the_field(http: httpx.Client) -> None:
    body = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"temperature": "hot"}}
    message = error_of(http.post(GENERATE, json=body), 400, "INVALID_ARGUMENT")
    assert "generationConfig.temperature" in message


def test_wrong_query_type_is_400(http: httpx.Client) -> None:
    error_of(http.get("/v1beta/models?pageSize=many"), 400, "INVALID_ARGUMENT")


def test_unknown_route_is_404_envelope(http: httpx.Client) -> None:
    error_of(http.get("/v1beta/nothing/here"), 404, "NOT_FOUND")
    error_of(http.get("/v2/models"), 404, "NOT_FOUND")


def test_unknown_model_on_generate_is_404(http: httpx.Client) -> None:
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    message = error_of(
        http.post("/v1beta/models/nope:generateContent", json=body), 404, "NOT_FOUND"
    )
    assert "Call ListModels" in message
    error_of(http.post("/v1beta/tunedModels/nope:generateContent", json=body), 404, "NOT_FOUND")


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    body = {"contents": [{"parts": [{"text": "x" * 1_100_000}]}]}
    error_of(http.post(GENERATE, json=body), 413, "INVALID_ARGUMENT")


def test_chunked_body_over_the_limit_is_413(http: httpx.Client) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(20):
            yield b"x" * 100_000

    r = http.post(GENERATE, content=chunks(), headers={"content-type": "application/json"})
    error_of(r, 413, "INVALID_ARGUMENT")


@pytest.mark.parametrize(
    "part",
    [{"inlineData": {"mimeType": "image/png", "data": "AAAA"}}, {"fileData": {"fileUri": "x"}}],
)
def test_non_text_parts_are_400(http: httpx.Client, part: dict[str, object]) -> None:
    body = {"contents": [{"parts": [{"text": "look"}, part]}]}
    message = error_of(http.post(GENERATE, json=body), 400, "INVALID_ARGUMENT")
    assert "contents[0].parts[1]" in message
    assert next(iter(part)) in message


def test_empty_contents_is_400(http: httpx.Client) -> None:
    error_of(http.post(GENERATE, json={"contents": []}), 400, "INVALID_ARGUMENT")


def test_unexpected_error_is_500_envelope_without_internals(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert "secret" not in error_of(r, 500, "INTERNAL")
    assert "Traceback" not in r.text


def test_a_json_body_sent_as_a_form_is_read_as_json(http: httpx.Client) -> None:
    # `curl -d '{...}'` without -H 'Content-Type: application/json' sends a form type
    headers = {"content-type": "application/x-www-form-urlencoded"}
    r = http.post(
        "/v1beta/tunedModels", content=b'{"baseModel": "models/tiny-gemma"}', headers=headers
    )
    assert r.status_code == 400
    assert "trainingData is required" in r.json()["error"]["message"]
