"""The newest google-genai against a live server (tiny model): listing models, generating and
counting tokens work, and `tunings.tune()` (which since 1.47 sends no training examples) gets a
400 naming the cause and the fix. The venv pins an older SDK, so the newest is pip-installed
once into .tunery/sdk-newest and driven by newest_sdk_client.py in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer, live_server

from tunery.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SDK_DIR = REPO / ".tunery" / "sdk-newest"
REFRESH_AFTER_S = 7 * 24 * 3600  # re-install a cached SDK older than this, to stay "newest"
SCRIPT = Path(__file__).with_name("newest_sdk_client.py")
TINY = "models/tiny-gemma"


@pytest.fixture(scope="session")
def newest_sdk() -> Path:
    """A --target dir holding the newest google-genai and its dependencies (skip if pip fails)."""
    marker = SDK_DIR / ".installed"
    if marker.exists() and time.time() - marker.stat().st_mtime < REFRESH_AFTER_S:
        return SDK_DIR
    staging = SDK_DIR.with_name(f".sdk-newest.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    result = subprocess.run(
        [*command, "--target", str(staging), "google-genai"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.skip(f"cannot pip-install the newest google-genai (offline?): {last}")
    (staging / ".installed").touch()
    shutil.rmtree(SDK_DIR, ignore_errors=True)
    os.rename(staging, SDK_DIR)
    return SDK_DIR


@pytest.fixture(scope="module")
def server(make_data_dir: Callable[[], Path]) -> Iterator[LiveServer]:
    """No worker (jobs stay CREATING); every request is recorded."""
    with live_server(Settings(data_dir=make_data_dir(), device="cpu", threads=1), record=True) as s:
        yield s


@pytest.fixture(scope="module")
def tuned_model(server: LiveServer) -> str:
    """A tuned model created over REST, for `tunings.get`."""
    examples = {"examples": [{"textInput": "1", "output": "2"}]}
    body = {"baseModel": TINY, "tuningTask": {"trainingData": {"examples": examples}}}
    r = httpx.post(f"{server.url}/v1beta/tunedModels", json=body, params={"tunedModelId": "rest"})
    assert r.status_code == 200, r.text
    return str(r.json()["metadata"]["tunedModel"])


@pytest.fixture(scope="module")
def seen(newest_sdk: Path, server: LiveServer, tuned_model: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(newest_sdk)}
    env.pop("GOOGLE_GENAI_API_VERSION", None)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), server.url, TINY, tuned_model],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_it_is_really_the_newest_sdk(seen: dict[str, Any]) -> None:
    major, minor = (int(part) for part in seen["version"].split(".")[:2])
    assert (major, minor) >= (1, 47), seen["version"]


def test_models_list_generate_and_count_tokens_work(seen: dict[str, Any]) -> None:
    assert TINY in seen["models"]
    assert isinstance(seen["text"], str)
    assert seen["total_tokens"] and seen["total_tokens"] > 0
    assert seen["count_tokens"] and seen["count_tokens"] > 0


def test_tune_without_examples_gets_a_400_naming_cause_and_fix(
    seen: dict[str, Any], server: LiveServer
) -> None:
    posts = [r for r in server.requests if r.method == "POST" and r.path.endswith("/tunedModels")]
    creates = [r for r in posts if json.loads(r.body).get("displayName") == "newest"]
    assert len(creates) == 1, server.requests
    assert creates[0].path == "/v1/tunedModels"  # 1.47+ default to v1, not v1beta
    sent = json.loads(creates[0].body)
    if sent.get("tuningTask", {}).get("trainingData"):
        pytest.fail(f"this google-genai sends training data again; revisit the 400: {sent}")
    tune = seen["tune"]
    print(tune["str"])
    assert (tune.get("error"), tune.get("code"), tune.get("status")) == (
        "ClientError",
        400,
        "INVALID_ARGUMENT",
    ), tune
    for shown in (tune["message"], tune["str"]):  # the attribute and what a traceback prints
        assert "tuningTask.trainingData is required" in shown
        assert "google-genai<=1.46" in shown
        assert "tunery tune" in shown


def test_tunings_get_still_works(seen: dict[str, Any], tuned_model: str) -> None:
    assert seen["get"]["name"] == tuned_model
    assert seen["get"]["base_model"] == TINY
    assert seen["get"]["state"].endswith("JOB_STATE_RUNNING")  # CREATING: no worker here
