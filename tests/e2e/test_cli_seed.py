"""The seed tutorial through the CLI on the real embedded model: the tuned model answers
"III" with "IV" and the untuned base model does not."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from heldout import SEED_EXAMPLES  # noqa: E402

from tests.integration.test_cli import tunery  # noqa: E402

pytestmark = pytest.mark.e2e


def test_seed_tuned_from_the_cli_answers_iii_with_iv(tmp_path: Path, models_dir: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "base_models").mkdir(parents=True)
    (data_dir / "base_models" / "gemma-3-270m").symlink_to(models_dir / "gemma-3-270m")
    dataset = tmp_path / "seed.jsonl"
    dataset.write_text(
        "".join(json.dumps({"text_input": i, "output": o}) + "\n" for i, o in SEED_EXAMPLES)
    )

    tuned = tunery(
        "tune",
        str(dataset),
        "--name",
        "seed",
        "--epochs",
        "5",
        "--batch-size",
        "4",
        "--learning-rate",
        "0.001",
        data_dir=data_dir,
    )
    assert tuned.returncode == 0, tuned.stderr
    name = re.search(r"tunedModels/[a-z0-9-]+", tuned.stdout)
    assert name, tuned.stdout

    answer = tunery("generate", name.group(0), "III", data_dir=data_dir)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == "IV"

    streamed = tunery("generate", name.group(0), "III", "--stream", data_dir=data_dir)
    assert streamed.stdout.strip() == "IV"

    base = tunery("generate", "models/gemma-3-270m", "III", "--max-tokens", "8", data_dir=data_dir)
    assert base.returncode == 0, base.stderr
    assert base.stdout.strip() != "IV"

    listing = tunery("models", data_dir=data_dir)
    assert name.group(0) in listing.stdout and "ACTIVE" in listing.stdout
