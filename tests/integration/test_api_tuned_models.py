"""Tuned-model routes without a worker: create → Operation, read, page, patch, delete, cancel,
and every way a create request can be refused (status code + envelope)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

EXAMPLES = [{"textInput": str(i), "output": str(i + 1)} for i in range(1, 9)]


def create_body(examples: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "baseModel": "models/tiny-gemma",
        "displayName": "Number Generator",
        "tuningTask": {
            "hyperparameters": {"epochCount": 1, "batchSize": 4, "learningRate": 0.01},
            "trainingData": {"examples": {"examples": examples or EXAMPLES}},
        },
    }
    body.update(extra)
    return body


def create(http: httpx.Client, **params: str) -> dict[str, Any]:
    r = http.post("/v1beta/tunedModels", json=create_body(), params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def assert_error(r: httpx.Response, code: int, status: str, *fragments: str) -> None:
    assert r.status_code == code, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert error["status"] == status
    for fragment in fragments:
        assert fragment in error["message"]


def test_create_returns_operation_with_metadata(http: httpx.Client) -> None:
    op = create(http)
    model_name = op["metadata"]["tunedModel"]
    assert model_name.startswith("tunedModels/number-generator-")
    assert op["name"].startswith(model_name + "/operations/")
    assert op["metadata"]["@type"].endswith("CreateTunedModelMetadata")
    assert op["metadata"]["totalSteps"] == 2
    assert op["metadata"]["completedSteps"] == 0
    assert op["done"] is False
    assert "response" not in op and "error" not in op


def test_create_honours_tuned_model_id(http: httpx.Client) -> None:
    op = create(http, tunedModelId="my-model")
    assert op["metadata"]["tunedModel"] == "tunedModels/my-model"
    again = http.post("/v1beta/tunedModels?tunedModelId=my-model", json=create_body())
    assert_error(again, 409, "ALREADY_EXISTS")


def test_create_accepts_snake_case_body(http: httpx.Client) -> None:
    body = {
        "base_model": "models/tiny-gemma",
        "display_name": "snake",
        "tuning_task": {
            "hyperparameters": {"epoch_count": 1, "batch_size": 2},
            "training_data": {"examples": {"examples": [{"text_input": "1", "output": "2"}]}},
        },
    }
    r = http.post("/v1beta/tunedModels", json=body)
    assert r.status_code == 200, r.text
    model = http.get(f"/v1beta/{r.json()['metadata']['tunedModel']}").json()
    assert model["displayName"] == "snake"
    assert model["tuningTask"]["hyperparameters"]["batchSize"] == 2


@pytest.mark.parametrize("version", ["v1beta", "v1"])  # google-genai >= 1.47 posts to /v1
def test_create_without_training_data_names_cause_and_fix(http: httpx.Client, version: str) -> None:
    body = {"baseModel": "models/tiny-gemma", "tuningTask": {"hyperparameters": {}}}
    r = http.post(f"/{version}/tunedModels", json=body)
    assert_error(r, 400, "INVALID_ARGUMENT", "google-genai 1.47", "google-genai<=1.46")


def test_create_with_too_long_output_names_the_example(http: httpx.Client) -> None:
    examples = [*EXAMPLES, {"textInput": "x", "output": "y" * 5001}]
    r = http.post("/v1beta/tunedModels", json=create_body(examples))
    assert_error(r, 400, "INVALID_ARGUMENT", "example 9", "5,001", "5,000")


def test_create_with_too_long_input_names_the_example(http: httpx.Client) -> None:
    examples = [{"textInput": "x" * 40_001, "output": "y"}, *EXAMPLES]
    r = http.post("/v1beta/tunedModels", json=create_body(examples))
    assert_error(r, 400, "INVALID_ARGUMENT", "example 1", "40,000")


def test_create_with_multi_turn_example_names_the_example(http: httpx.Client) -> None:
    turns = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "output": "x"}
    r = http.post("/v1beta/tunedModels", json=create_body([*EXAMPLES, turns]))
    assert_error(r, 400, "INVALID_ARGUMENT", "example 9", "contents")


def test_create_on_unknown_base_model_is_404(http: httpx.Client) -> None:
    r = http.post("/v1beta/tunedModels", json=create_body(baseModel="models/nope"))
    assert_error(r, 404, "NOT_FOUND", "models/nope")


def test_get_and_list_never_echo_training_data(http: httpx.Client) -> None:
    name = create(http)["metadata"]["tunedModel"]
    model = http.get(f"/v1beta/{name}").json()
    assert model["name"] == name
    assert model["state"] == "CREATING"
    assert model["baseModel"] == "models/tiny-gemma"
    assert "trainingData" not in model["tuningTask"]
    assert model["tuningTask"]["hyperparameters"] == {
        "epochCount": 1,
        "batchSize": 4,
        "learningRate": 0.01,
    }
    listed = http.get("/v1beta/tunedModels").json()["tunedModels"]
    assert [m["name"] for m in listed] == [name]
    assert "trainingData" not in listed[0]["tuningTask"]


def test_learning_rate_multiplier_is_shown_as_a_learning_rate(http: httpx.Client) -> None:
    body = create_body()
    body["tuningTask"]["hyperparameters"] = {"learningRateMultiplier": 2.0}
    name = http.post("/v1beta/tunedModels", json=body).json()["metadata"]["tunedModel"]
    hp = http.get(f"/v1beta/{name}").json()["tuningTask"]["hyperparameters"]
    assert "learningRateMultiplier" not in hp
    assert hp["learningRate"] == pytest.approx(0.002)


def test_list_pages_without_empty_last_page(http: httpx.Client) -> None:
    names = {create(http)["metadata"]["tunedModel"] for _ in range(3)}
    first = http.get("/v1beta/tunedModels", params={"pageSize": 2}).json()
    assert len(first["tunedModels"]) == 2
    second = http.get(
        "/v1beta/tunedModels", params={"pageSize": 2, "pageToken": first["nextPageToken"]}
    ).json()
    assert len(second["tunedModels"]) == 1
    assert "nextPageToken" not in second
    assert {m["name"] for m in first["tunedModels"] + second["tunedModels"]} == names


def test_patch_updates_only_fields_in_update_mask(http: httpx.Client) -> None:
    name = create(http)["metadata"]["tunedModel"]
    r = http.patch(
        f"/v1beta/{name}",
        params={"updateMask": "description"},
        json={"displayName": "ignored", "description": "new words"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["description"] == "new words"
    assert r.json()["displayName"] == "Number Generator"


def test_patch_without_mask_updates_fields_present(http: httpx.Client) -> None:
    name = create(http)["metadata"]["tunedModel"]
    r = http.patch(f"/v1beta/{name}", json={"display_name": "renamed", "temperature": 0.2})
    assert r.status_code == 200, r.text
    assert r.json()["displayName"] == "renamed"
    assert r.json()["temperature"] == pytest.approx(0.2)
    assert http.get(f"/v1beta/{name}").json()["displayName"] == "renamed"


def test_patch_of_immutable_field_is_400(http: httpx.Client) -> None:
    name = create(http)["metadata"]["tunedModel"]
    r = http.patch(f"/v1beta/{name}?updateMask=baseModel", json={"baseModel": "models/x"})
    assert_error(r, 400, "INVALID_ARGUMENT", "baseModel")


def test_delete_returns_empty_object_then_404(http: httpx.Client) -> None:
    name = create(http)["metadata"]["tunedModel"]
    r = http.delete(f"/v1beta/{name}")
    assert r.status_code == 200
    assert r.json() == {}
    assert_error(http.get(f"/v1beta/{name}"), 404, "NOT_FOUND", name)


@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_operation_get_and_list(http: httpx.Client, version: str) -> None:
    op = create(http)
    got = http.get(f"/{version}/{op['name']}")
    assert got.status_code == 200
    assert got.json()["name"] == op["name"]
    listed = http.get(f"/{version}/{op['metadata']['tunedModel']}/operations").json()
    assert [o["name"] for o in listed["operations"]] == [op["name"]]
    missing = http.get(f"/{version}/{op['metadata']['tunedModel']}/operations/nope")
    assert_error(missing, 404, "NOT_FOUND")


def test_cancel_operation_finishes_it_with_an_error(http: httpx.Client) -> None:
    op = create(http)
    r = http.post(f"/v1/{op['name']}:cancel")
    assert r.status_code == 200
    assert r.json() == {}
    done = http.get(f"/v1beta/{op['name']}").json()
    assert done["done"] is True
    assert done["error"]["code"] == 1  # google.rpc.Code.CANCELLED
    assert "response" not in done
    model = http.get(f"/v1beta/{op['metadata']['tunedModel']}").json()
    assert model["state"] == "FAILED"


def test_cancel_by_tuned_model_name(http: httpx.Client) -> None:
    name = create(http)["metadata"]["tunedModel"]
    assert http.post(f"/v1beta/{name}:cancel").status_code == 200
    assert http.get(f"/v1beta/{name}").json()["state"] == "FAILED"


def test_generate_while_creating_is_failed_precondition(http: httpx.Client) -> None:
    name = create(http)["metadata"]["tunedModel"]
    body = {"contents": [{"role": "user", "parts": [{"text": "3"}]}]}
    r = http.post(f"/v1beta/{name}:generateContent", json=body)
    assert_error(r, 400, "FAILED_PRECONDITION", "is not ready", "% done")


def test_generate_on_cancelled_model_gives_the_reason(http: httpx.Client) -> None:
    name = create(http)["metadata"]["tunedModel"]
    http.post(f"/v1beta/{name}:cancel")
    body = {"contents": [{"parts": [{"text": "3"}]}]}
    r = http.post(f"/v1beta/{name}:generateContent", json=body)
    assert_error(r, 400, "FAILED_PRECONDITION", "cancelled")
