"""The `tunery` CLI as a user runs it: real subprocesses, one-line errors, non-zero exits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import LiveServer


def tunery(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNERY_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "tunery", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_bad_rows_are_reported_by_row_number_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    rows = [
        {"text_input": "1", "output": "2"},
        {"text_input": "3"},
        {"text_input": "x" * 40_001, "output": "y"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    result = tunery("tune", str(data), data_dir=tmp_path / "d")

    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "line 2" in lines[0] and "line 3" in lines[0] and "40,000" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d" / "tuned_models").exists()  # nothing half-trained


def test_missing_file_and_bad_hyperparameters_are_one_line_errors(tmp_path: Path) -> None:
    missing = tunery("tune", str(tmp_path / "nope.jsonl"), data_dir=tmp_path / "d")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "nope.jsonl" in missing.stderr

    data = tmp_path / "ok.csv"
    data.write_text("text_input,output\n1,2\n")
    bad = tunery("tune", str(data), "--epochs", "0", data_dir=tmp_path / "d")
    assert bad.returncode == 1 and "epochCount" in bad.stderr and "Traceback" not in bad.stderr


def test_unknown_model_is_a_one_line_error(tmp_path: Path) -> None:
    result = tunery("generate", "tunedModels/nope", "hi", data_dir=tmp_path / "d")
    assert result.returncode == 1
    assert "not found" in result.stderr and "Traceback" not in result.stderr


def test_bad_setting_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNERY_DECODE_BACKEND", "warp-drive")
    for args in (("models",), ("generate", "tunedModels/x", "hi")):
        result = tunery(*args, data_dir=tmp_path / "d")
        assert result.returncode == 1, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "TUNERY_DECODE_BACKEND" in lines[0], result.stderr
        assert "llama-cpp" in lines[0] and "internal error" not in lines[0]


def test_models_lists_the_embedded_base_model(tmp_path: Path) -> None:
    result = tunery("models", data_dir=tmp_path / "d")
    assert result.returncode == 0, result.stderr
    assert "models/gemma-3-270m" in result.stdout


def test_tune_and_generate_against_a_server(worker_server: LiveServer, tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text_input,output\n1,2\n3,4\n5,6\n")
    url = worker_server.url

    tuned = tunery(
        "tune",
        str(data),
        "--base",
        "tiny-gemma",
        "--epochs",
        "2",
        "--name",
        "remote",
        "--server",
        url,
        data_dir=tmp_path / "unused",
    )
    assert tuned.returncode == 0, tuned.stderr
    match = re.search(r"tunedModels/remote-[a-z0-9]+", tuned.stdout)
    assert match, tuned.stdout
    assert "step 2/2" in tuned.stderr  # the live bar reached the end

    listing = tunery("models", "--server", url, data_dir=tmp_path / "unused")
    assert match.group(0) in listing.stdout and "ACTIVE" in listing.stdout
    answer = tunery(
        "generate",
        match.group(0),
        "1",
        "--max-tokens",
        "3",
        "--server",
        url,
        data_dir=tmp_path / "unused",
    )
    assert answer.returncode == 0, answer.stderr
    streamed = tunery(
        "generate",
        match.group(0),
        "1",
        "--max-tokens",
        "3",
        "--stream",
        "--server",
        url,
        data_dir=tmp_path / "unused",
    )
    assert streamed.stdout == answer.stdout  # greedy: the same text either way


def test_serve_options_left_out_take_the_tunery_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tunery serve` without --workers/--port/--host keeps TUNERY_WORKERS etc. (the options'
    own defaults once overrode them: TUNERY_WORKERS=0 still started a worker)."""
    from tunery import cli

    monkeypatch.setenv("TUNERY_WORKERS", "0")
    monkeypatch.setenv("TUNERY_PORT", "9123")
    monkeypatch.setenv("TUNERY_HOST", "0.0.0.0")
    settings = cli._settings(tmp_path, None, host=None, port=None, workers=None)
    assert (settings.workers, settings.port, settings.host) == (0, 9123, "0.0.0.0")
    given = cli._settings(tmp_path, None, host="127.0.0.1", port=8001, workers=2)
    assert (given.workers, given.port, given.host) == (2, 8001, "127.0.0.1")
    monkeypatch.delenv("TUNERY_WORKERS")
    assert cli._settings(tmp_path, None, workers=None).workers == 1
    assert cli._settings(tmp_path, None, workers=0).workers == 0
