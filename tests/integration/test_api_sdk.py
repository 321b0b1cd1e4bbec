"""The real google-genai SDK (pinned 1.41.0) against a live server on the tiny model: the calls
the seed tutorial makes, plus update/delete/cancel and how SDK errors surface."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google import genai
from google.genai import errors, types
from live_server import LiveServer, wait_until

DATASET = types.TuningDataset(
    examples=[types.TuningExample(text_input=str(i), output=str(i + 1)) for i in range(1, 9)]
)


@pytest.fixture(scope="module")
def client(worker_server: LiveServer) -> Iterator[genai.Client]:
    yield genai.Client(api_key="k", http_options=types.HttpOptions(base_url=worker_server.url))


def tune(client: genai.Client, epochs: int = 1) -> types.TuningJob:
    return client.tunings.tune(
        base_model="models/tiny-gemma",
        training_dataset=DATASET,
        config=types.CreateTuningJobConfig(
            epoch_count=epochs, batch_size=4, learning_rate=0.01, tuned_model_display_name="sdk"
        ),
    )


@pytest.fixture(scope="module")
def finished(client: genai.Client) -> types.TuningJob:
    job = tune(client)
    assert job.name and job.name.startswith("tunedModels/sdk-")
    state: list[types.TuningJob] = [job]

    def ended() -> bool:
        state[0] = client.tunings.get(name=job.name or "")
        return bool(state[0].has_ended)

    wait_until(ended, timeout=180, what="the SDK's tuning job to end")
    return state[0]


def test_models_list_shows_tunable_base_models(client: genai.Client) -> None:
    models = {m.name: m for m in client.models.list()}
    assert "models/tiny-gemma" in models
    assert "createTunedModel" in (models["models/tiny-gemma"].supported_actions or [])


def test_tune_poll_and_generate(client: genai.Client, finished: types.TuningJob) -> None:
    assert finished.has_succeeded
    assert finished.tuned_model is not None and finished.tuned_model.model
    response = client.models.generate_content(model=finished.tuned_model.model, contents="3")
    assert isinstance(response.text, str)
    assert response.usage_metadata and response.usage_metadata.total_token_count


def test_stream_and_count_tokens(client: genai.Client, finished: types.TuningJob) -> None:
    model = finished.name or ""
    chunks = list(
        client.models.generate_content_stream(
            model=model, contents="3", config=types.GenerateContentConfig(max_output_tokens=4)
        )
    )
    assert chunks[-1].candidates and chunks[-1].candidates[0].finish_reason is not None
    assert client.models.count_tokens(model=model, contents="3").total_tokens


def test_tunings_list_includes_the_job(client: genai.Client, finished: types.TuningJob) -> None:
    assert finished.name in [j.name for j in client.tunings.list()]


def test_cancel_ends_a_running_job(client: genai.Client) -> None:
    job = tune(client, epochs=50)
    client.tunings.cancel(name=job.name or "")
    wait_until(lambda: client.tunings.get(name=job.name or "").has_ended, timeout=60, what="cancel")
    assert client.tunings.get(name=job.name or "").state == types.JobState.JOB_STATE_FAILED


def test_update_and_delete_a_tuned_model(client: genai.Client, finished: types.TuningJob) -> None:
    job = tune(client)
    model = client.models.update(
        model=job.name or "", config=types.UpdateModelConfig(description="renamed by the SDK")
    )
    assert model.description == "renamed by the SDK"
    client.models.delete(model=job.name or "")
    with pytest.raises(errors.ClientError) as caught:
        client.tunings.get(name=job.name or "")
    assert caught.value.code == 404
    assert caught.value.status == "NOT_FOUND"


def test_sdk_raises_client_error_for_json_mode(
    client: genai.Client, finished: types.TuningJob
) -> None:
    config = types.GenerateContentConfig(response_mime_type="application/json")
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(model=finished.name or "", contents="3", config=config)
    assert caught.value.code == 400
    assert "JSON mode is not supported with tuned models" in (caught.value.message or "")
