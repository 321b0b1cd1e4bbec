"""Generation on base and tuned models through a live server with a real worker (tiny model):
generateContent, both stream formats, countTokens, and the tuned-model limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live_server import LiveServer, wait_until

EXAMPLES = [{"textInput": str(i), "output": str(i + 1)} for i in range(1, 9)]
PROMPT = {"contents": [{"role": "user", "parts": [{"text": "3"}]}]}


@pytest.fixture(scope="module")
def client(worker_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=worker_server.url, timeout=120) as c:
        yield c


def tune_to_end(client: httpx.Client, body: dict[str, object]) -> str:
    """Create a tuned model, wait for the worker to finish it, and return its name."""
    r = client.post("/v1beta/tunedModels", json=body)
    assert r.status_code == 200, r.text
    name: str = r.json()["metadata"]["tunedModel"]

    def state() -> str:
        return str(client.get(f"/v1beta/{name}").json()["state"])

    wait_until(lambda: state() != "CREATING", timeout=180, what=f"{name} to finish tuning")
    assert state() == "ACTIVE"
    return name


@pytest.fixture(scope="module")
def tuned(client: httpx.Client) -> str:
    """The name of an ACTIVE tuned model on the tiny base."""
    body = {
        "baseModel": "models/tiny-gemma",
        "tuningTask": {
            "hyperparameters": {"epochCount": 1, "batchSize": 4},
            "trainingData": {"examples": {"examples": EXAMPLES}},
        },
    }
    return tune_to_end(client, body)


def assert_error(r: httpx.Response, code: int, status: str, fragment: str) -> None:
    assert r.status_code == code, r.text
    assert r.json()["error"]["status"] == status
    assert fragment in r.json()["error"]["message"]


def test_finished_operation_carries_the_tuned_model(client: httpx.Client, tuned: str) -> None:
    ops = client.get(f"/v1beta/{tuned}/operations").json()["operations"]
    assert ops[0]["done"] is True
    assert ops[0]["metadata"]["completedPercent"] == 100
    assert ops[0]["response"]["@type"].endswith("v1beta.TunedModel")
    assert ops[0]["response"]["name"] == tuned
    assert "error" not in ops[0]
    model = client.get(f"/v1beta/{tuned}").json()
    assert model["tuningTask"]["snapshots"][0]["step"] == 1
    assert "completeTime" in model["tuningTask"]


def test_google_genai_1_46_body_with_snake_case_examples_tunes_to_active(
    client: httpx.Client,
) -> None:
    """google-genai 1.42-1.46 send camelCase fields but snake_case `text_input` examples."""
    examples = [{"text_input": str(i), "output": str(i + 1)} for i in range(1, 5)]
    body = {
        "baseModel": "models/tiny-gemma",
        "displayName": "sdk 1.46",
        "tuningTask": {
            "hyperparameters": {"epochCount": 1, "batchSize": 2, "learningRate": 0.01},
            "trainingData": {"examples": {"examples": examples}},
        },
    }
    name = tune_to_end(client, body)
    model = client.get(f"/v1beta/{name}").json()
    assert model["tuningTask"]["snapshots"][-1]["step"] == 2  # 4 examples / batch 2, 1 epoch
    r = client.post(f"/v1beta/{name}:generateContent", json=PROMPT)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("collection", ["tuned", "base"])
def test_generate_content_response_shape(client: httpx.Client, tuned: str, collection: str) -> None:
    model = tuned if collection == "tuned" else "models/tiny-gemma"
    body = {**PROMPT, "generationConfig": {"maxOutputTokens": 4, "temperature": 0}}
    r = client.post(f"/v1beta/{model}:generateContent", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    candidate = out["candidates"][0]
    assert candidate["content"]["role"] == "model"
    assert isinstance(candidate["content"]["parts"][0]["text"], str)
    assert candidate["finishReason"] in ("STOP", "MAX_TOKENS")
    assert candidate["index"] == 0
    usage = out["usageMetadata"]
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert out["modelVersion"] == model
    assert out["responseId"]


def test_candidate_count_gives_several_candidates(client: httpx.Client, tuned: str) -> None:
    body = {**PROMPT, "generationConfig": {"candidateCount": 2, "maxOutputTokens": 3, "seed": 1}}
    out = client.post(f"/v1beta/{tuned}:generateContent", json=body).json()
    assert [c["index"] for c in out["candidates"]] == [0, 1]


def test_stream_sse_sends_data_events_ending_with_usage(client: httpx.Client, tuned: str) -> None:
    body = {**PROMPT, "generationConfig": {"maxOutputTokens": 5, "temperature": 0}}
    r = client.post(f"/v1beta/{tuned}:streamGenerateContent?alt=sse", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events]
    assert chunks[-1]["candidates"][0]["finishReason"] in ("STOP", "MAX_TOKENS")
    assert "usageMetadata" in chunks[-1]


def test_stream_without_sse_is_one_json_array(client: httpx.Client, tuned: str) -> None:
    body = {**PROMPT, "generationConfig": {"maxOutputTokens": 5}}
    r = client.post(f"/v1beta/{tuned}:streamGenerateContent", json=body)
    assert r.status_code == 200
    chunks = r.json()
    assert isinstance(chunks, list)
    assert chunks[-1]["candidates"][0]["finishReason"] in ("STOP", "MAX_TOKENS")


def test_a_client_gone_mid_stream_frees_its_batch_row(
    worker_server: LiveServer, client: httpx.Client
) -> None:
    body = {**PROMPT, "generationConfig": {"maxOutputTokens": 8000, "temperature": 0}}
    path = "/v1beta/models/tiny-gemma:streamGenerateContent?alt=sse"
    with client.stream("POST", path, json=body) as r:
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line).removeprefix("data: "))
        assert "finishReason" not in first["candidates"][0]  # still decoding
        scheduler = worker_server.app.state.services.inference._generators["tiny-gemma"]._batcher
        assert scheduler.pending() == 1
    # The connection is closed: the server notices, closes the stream and frees the row (long
    # before its 8,000 tokens: ~30 s on this model).
    wait_until(lambda: scheduler.pending() == 0, timeout=5, what="the row to be freed")
    r = client.post(
        "/v1beta/models/tiny-gemma:generateContent",
        json=body | {"generationConfig": {"maxOutputTokens": 3}},
    )
    assert r.status_code == 200  # and the server serves on


def test_count_tokens_on_tuned_and_base(client: httpx.Client, tuned: str) -> None:
    base = client.post("/v1beta/models/tiny-gemma:countTokens", json=PROMPT).json()
    wrapped = client.post(f"/v1beta/{tuned}:countTokens", json=PROMPT).json()
    assert base["totalTokens"] >= 1
    # A tuned model sees its input inside the training template.
    assert wrapped["totalTokens"] > base["totalTokens"]


def test_json_mode_on_tuned_model_is_400(client: httpx.Client, tuned: str) -> None:
    body = {**PROMPT, "generationConfig": {"responseMimeType": "application/json"}}
    r = client.post(f"/v1beta/{tuned}:generateContent", json=body)
    assert_error(r, 400, "INVALID_ARGUMENT", "JSON mode is not supported with tuned models")


def test_system_instruction_on_tuned_model_is_400(client: httpx.Client, tuned: str) -> None:
    body = {**PROMPT, "systemInstruction": {"parts": [{"text": "be brief"}]}}
    r = client.post(f"/v1beta/{tuned}:generateContent", json=body)
    assert_error(r, 400, "INVALID_ARGUMENT", "systemInstruction")


def test_too_long_input_on_tuned_model_is_400(client: httpx.Client, tuned: str) -> None:
    body = {"contents": [{"parts": [{"text": "x" * 40_001}]}]}
    r = client.post(f"/v1beta/{tuned}:generateContent", json=body)
    assert_error(r, 400, "INVALID_ARGUMENT", "40,000")


def test_tuned_model_answers_the_last_user_turn(client: httpx.Client, tuned: str) -> None:
    turns = {
        "contents": [
            {"role": "user", "parts": [{"text": "1"}]},
            {"role": "model", "parts": [{"text": "2"}]},
            {"role": "user", "parts": [{"text": "3"}]},
        ],
        "generationConfig": {"temperature": 0, "maxOutputTokens": 4},
    }
    single = {**PROMPT, "generationConfig": {"temperature": 0, "maxOutputTokens": 4}}
    a = client.post(f"/v1beta/{tuned}:generateContent", json=turns).json()
    b = client.post(f"/v1beta/{tuned}:generateContent", json=single).json()
    assert a["candidates"][0]["content"] == b["candidates"][0]["content"]
    assert a["usageMetadata"]["promptTokenCount"] == b["usageMetadata"]["promptTokenCount"]


def test_concurrent_requests_on_one_base_all_succeed(client: httpx.Client, tuned: str) -> None:
    body = {**PROMPT, "generationConfig": {"temperature": 0, "maxOutputTokens": 4}}
    targets = [tuned, "models/tiny-gemma"] * 4

    def call(model: str) -> dict[str, object]:
        r = client.post(f"/v1beta/{model}:generateContent", json=body)
        assert r.status_code == 200, r.text
        return dict(r.json())

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, targets))
    pairs = zip(results, targets, strict=True)
    tuned_texts = {json.dumps(r["candidates"]) for r, m in pairs if m == tuned}
    assert len(tuned_texts) == 1  # greedy decoding is not disturbed by the base-model requests
