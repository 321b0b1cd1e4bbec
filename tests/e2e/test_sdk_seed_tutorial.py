"""The seed fine-tuning tutorial, run with google-genai 1.41.0 against `tunery serve` (a real
subprocess with its worker process) on the embedded gemma-3-270m. The tutorial's code is kept
as written except for the base URL, the base model and polling until the job has ended."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from google import genai
from google.genai import types

pytestmark = pytest.mark.e2e

TUNE_TIMEOUT_S = float(os.environ.get("TUNERY_E2E_TUNE_TIMEOUT", "1800"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serve(data: Path, **env_extra: str) -> Iterator[str]:
    """`python -m tunery serve` on `data` until the block ends; yields its URL once healthy."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNERY_API_KEYS": "seed-key", **env_extra}
    log_path = data / f"serve-{port}.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tunery", "serve", "--port", str(port), "--data-dir", str(data)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"tunery serve did not start:\n{log_path.read_text()}")
        time.sleep(0.2)
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def data_dir(make_data_dir: Callable[[], Path]) -> Path:
    """A fresh data dir sharing the converted embedded model."""
    return make_data_dir()


@pytest.fixture(scope="module")
def server_url(data_dir: Path) -> Iterator[str]:
    with _serve(data_dir) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url: str) -> genai.Client:
    return genai.Client(api_key="seed-key", http_options=types.HttpOptions(base_url=server_url))


@pytest.fixture(scope="module")
def tuning_job(client: genai.Client) -> types.TuningJob:
    # --- the tutorial, verbatim but for base_model -----------------------------------------
    training_dataset = [
        ["1", "2"],
        ["3", "4"],
        ["-3", "-2"],
        ["twenty two", "twenty three"],
        ["two hundred", "two hundred one"],
        ["ninety nine", "one hundred"],
        ["8", "9"],
        ["-98", "-97"],
        ["1,000", "1,001"],
        ["10,100,000", "10,100,001"],
        ["thirteen", "fourteen"],
        ["eighty", "eighty one"],
        ["one", "two"],
        ["three", "four"],
        ["seven", "eight"],
    ]
    training_dataset = types.TuningDataset(
        examples=[
            types.TuningExample(
                text_input=i,
                output=o,
            )
            for i, o in training_dataset
        ],
    )
    started = time.perf_counter()
    tuning_job = client.tunings.tune(
        base_model="models/gemma-3-270m",
        training_dataset=training_dataset,
        config=types.CreateTuningJobConfig(
            epoch_count=5,
            batch_size=4,
            learning_rate=0.001,
            tuned_model_display_name="test tuned model",
        ),
    )
    # --- poll until it has ended (the tutorial's real service is ready when it returns) -------
    deadline = time.monotonic() + TUNE_TIMEOUT_S
    while not tuning_job.has_ended:
        assert time.monotonic() < deadline, "tuning did not finish in time"
        time.sleep(2)
        tuning_job = client.tunings.get(name=tuning_job.name or "")
    print(f"\ntune() to {tuning_job.state}: {time.perf_counter() - started:.1f} s")
    return tuning_job


def test_models_list_shows_the_embedded_base_model(client: genai.Client) -> None:
    names = [model_info.name for model_info in client.models.list()]
    assert "models/gemma-3-270m" in names


def test_tuned_model_answers_the_tutorial_prompt(
    client: genai.Client, tuning_job: types.TuningJob
) -> None:
    assert tuning_job.has_succeeded
    assert tuning_job.tuned_model is not None
    started = time.perf_counter()
    response = client.models.generate_content(
        model=tuning_job.tuned_model.model,
        contents="III",
    )
    took = time.perf_counter() - started
    print(f"\ngenerate_content('III') -> {response.text!r} in {took * 1000:.0f} ms (first call)")
    started = time.perf_counter()
    client.models.generate_content(model=tuning_job.tuned_model.model, contents="III")
    print(f"generate_content('III') again: {(time.perf_counter() - started) * 1000:.0f} ms")
    assert (response.text or "").strip() == "IV"


def test_tunings_list_stream_and_count_tokens(
    client: genai.Client, tuning_job: types.TuningJob
) -> None:
    assert tuning_job.name in [job.name for job in client.tunings.list()]
    model = tuning_job.tuned_model.model if tuning_job.tuned_model else ""
    text = "".join(
        c.text or "" for c in client.models.generate_content_stream(model=model, contents="III")
    )
    assert text.strip()
    assert (client.models.count_tokens(model=model, contents="III").total_tokens or 0) > 0


def test_cancel_stops_a_second_tuning_job(client: genai.Client) -> None:
    job = client.tunings.tune(
        base_model="models/gemma-3-270m",
        training_dataset=types.TuningDataset(
            examples=[types.TuningExample(text_input="1", output="2")]
        ),
        config=types.CreateTuningJobConfig(epoch_count=100, tuned_model_display_name="cancel me"),
    )
    client.tunings.cancel(name=job.name or "")
    deadline = time.monotonic() + 300
    while not job.has_ended:
        assert time.monotonic() < deadline, "the cancelled job did not end"
        time.sleep(1)
        job = client.tunings.get(name=job.name or "")
    assert job.state == types.JobState.JOB_STATE_FAILED


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python (the llamacpp extra)"
)
def test_llama_cpp_backend_serves_the_tuned_model(
    data_dir: Path, tuning_job: types.TuningJob
) -> None:
    """A second server on the same data, decoding with llama.cpp: the same SDK calls, the same
    answer (its adapter is converted to a GGUF LoRA on first use)."""
    assert tuning_job.tuned_model is not None
    model = tuning_job.tuned_model.model or ""
    with _serve(data_dir, TUNERY_DECODE_BACKEND="llama-cpp", TUNERY_WORKERS="0") as url:
        llama = genai.Client(api_key="seed-key", http_options=types.HttpOptions(base_url=url))
        response = llama.models.generate_content(model=model, contents="III")
        assert (response.text or "").strip() == "IV"
        streamed = "".join(
            c.text or "" for c in llama.models.generate_content_stream(model=model, contents="III")
        )
        assert streamed.strip() == "IV"
    assert list((data_dir / "tuned_models").glob("*/adapter/adapter_model.gguf"))
