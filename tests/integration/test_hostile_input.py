"""Hostile input: a schemathesis run over our own OpenAPI spec, oversized and chunked bodies,
path tricks in ids and names, and the API key's handling (constant-time, never logged)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fuzz_api import fuzz
from live_server import LiveServer, live_server

from tunery.engine.base_models import BaseModelRegistry
from tunery.errors import InvalidArgument
from tunery.settings import Settings

FUZZ_EXAMPLES = 10  # per operation; bench/fuzz_bench.py runs many more


@pytest.fixture(scope="module")
def fuzz_server(make_data_dir: Callable[[], Path]) -> Iterator[LiveServer]:
    settings = Settings(
        data_dir=make_data_dir(), device="cpu", threads=1, max_request_bytes=200_000
    )
    with live_server(settings) as server:
        yield server


def test_fuzzed_requests_never_get_a_server_error_or_a_response_off_the_schema(
    fuzz_server: LiveServer,
) -> None:
    pytest.importorskip("schemathesis")
    report = fuzz(fuzz_server.url, max_examples=FUZZ_EXAMPLES)

    assert report.failures == []
    assert len(report.by_operation) >= 10  # every route was exercised
    print(f"schemathesis: {report.cases} cases, 0 failures")


# -- sizes -----------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(http: httpx.Client) -> None:
    limit = 1_000_000  # the `settings` fixture's max_request_bytes
    response = http.post("/v1beta/tunedModels", content=b"x" * (limit + 1))
    assert response.status_code == 413
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert "exceeds the limit" in response.json()["error"]["message"]


def test_a_chunked_body_over_the_limit_is_refused_with_413(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"y" * 50_000  # 2 MB in all, no Content-Length

    response = http.post("/v1beta/tunedModels", content=chunks())
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413


# -- path tricks -------------------------------------------------------------------------------

WEIRD_IDS = [
    "..",
    "..%2F..%2Fetc",
    "%2E%2E%2F%2E%2E",
    "a%2F..%2F..%2Fdata",
    "%00",
    "x" * 5000,
    "%C3%A9t%C3%A9",  # été
    "%E2%80%AE",  # right-to-left override
    "CON",
    "-leading-dash",
]


@pytest.mark.parametrize("weird", WEIRD_IDS)
def test_weird_tuned_model_ids_are_not_found_and_touch_no_files(
    http: httpx.Client, settings: Settings, weird: str, tmp_path: Path
) -> None:
    bait = settings.data_dir.parent / "bait"
    bait.mkdir(exist_ok=True)
    (bait / "keep.txt").write_text("keep")
    before = sorted(
        p.relative_to(settings.data_dir.parent) for p in settings.data_dir.parent.rglob("*")
    )

    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", ":generateContent")):
        body = {"contents": [{"parts": [{"text": "hi"}]}]} if method == "POST" else None
        response = http.request(method, f"/v1beta/tunedModels/{weird}{suffix}", json=body)
        assert response.status_code in (400, 404), (method, response.text)
        assert response.json()["error"]["status"] in ("NOT_FOUND", "INVALID_ARGUMENT")

    after = sorted(
        p.relative_to(settings.data_dir.parent) for p in settings.data_dir.parent.rglob("*")
    )
    assert [p for p in before if p not in after] == []  # nothing deleted anywhere
    assert (bait / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize(
    "model_id", ["../escape", "a/b", "ÉTÉ", "x" * 41, "a-", "9abc", "a b", "a\x00b"]
)
def test_a_tuned_model_id_that_is_not_a_plain_slug_is_refused(
    http: httpx.Client, model_id: str
) -> None:
    body = {
        "baseModel": "models/tiny-gemma",
        "tuningTask": {
            "trainingData": {"examples": {"examples": [{"textInput": "a", "output": "b"}]}}
        },
    }
    response = http.post("/v1beta/tunedModels", params={"tunedModelId": model_id}, json=body)
    assert response.status_code == 400, response.text
    assert "tunedModelId" in response.json()["error"]["message"]


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x\x00y", "..", "a\\b"])
def test_base_model_names_with_path_parts_are_refused_at_registration(
    tmp_path: Path, tiny_model_path: Path, name: str
) -> None:
    registry = BaseModelRegistry(tmp_path / "base_models", "cpu")
    with pytest.raises(InvalidArgument):
        registry.register(name, tiny_model_path)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("weird", ["..%2F..%2Fetc%2Fpasswd", "%2E%2E", "x" * 3000])
def test_weird_base_model_names_are_not_found(http: httpx.Client, weird: str) -> None:
    response = http.get(f"/v1beta/models/{weird}")
    assert response.status_code == 404
    response = http.post(
        f"/v1beta/models/{weird}:generateContent",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
    )
    assert response.status_code == 404


# -- the API key -------------------------------------------------------------------------------


def test_the_api_key_never_appears_in_the_logs(
    keyed_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "key-alice"
    with httpx.Client(base_url=keyed_server.url) as client:
        client.get("/v1beta/tunedModels", headers={"x-goog-api-key": secret})
        client.get("/v1beta/tunedModels", params={"key": "wrong-secret-key"})
        client.get("/v1beta/tunedModels/nope", headers={"x-goog-api-key": secret})
        client.post("/v1beta/tunedModels", headers={"x-goog-api-key": secret}, content=b"{bad")

    # The server's records only (httpx, the client here, logs the URLs it calls).
    logged = "\n".join(
        r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))
    )
    assert secret not in logged and "wrong-secret-key" not in logged


def test_the_access_log_blanks_keys_passed_in_the_query_string() -> None:
    from tunery.server import RedactApiKeys

    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', None, None
    )
    record.args = ("127.0.0.1:5", "GET", "/v1beta/models?pageSize=2&key=s3cret&x=1", "1.1", 200)
    RedactApiKeys().filter(record)
    assert "s3cret" not in record.getMessage()
    assert "key=REDACTED&x=1" in record.getMessage()


def test_keys_are_compared_in_constant_time_against_every_known_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hmac

    from tunery.api import deps

    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    auth = deps.Authenticator(["k1", "k2", "k3"], lambda: [])
    assert auth.owner("k1") is not None
    assert len(compared) == 3  # no early exit on the first match
    compared.clear()
    with pytest.raises(deps.InvalidApiKey):
        auth.owner("nope")
    assert len(compared) == 3


@pytest.mark.parametrize(
    "where",
    ["displayName", "description", "textInput", "filter"],
)
def test_nul_characters_are_refused_as_invalid_on_every_database(
    http: httpx.Client, where: str
) -> None:
    example = {"textInput": "a\x00b" if where == "textInput" else "a", "output": "b"}
    body: dict[str, Any] = {
        "baseModel": "models/tiny-gemma",
        "tuningTask": {"trainingData": {"examples": {"examples": [example]}}},
    }
    if where in ("displayName", "description"):
        body[where] = "x\x00y"
    if where == "filter":
        response = http.get("/v1beta/tunedModels", params={"filter": "a\x00"})
    else:
        response = http.post("/v1beta/tunedModels", json=body)
    assert response.status_code == 400, response.text
    assert "NUL" in response.json()["error"]["message"]
