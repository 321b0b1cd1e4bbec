"""Shared fixtures: the embedded model converted once per machine, and a tiny random model.

The embedded model's conversion (~50 s) is cached in `.tunery/test-cache` (or
$TUNERY_TEST_CACHE) so every test session after the first loads it in seconds.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # test servers and workers share 2 cores

REPO = Path(__file__).resolve().parents[1]
TEST_CACHE = Path(os.environ.get("TUNERY_TEST_CACHE", REPO / ".tunery" / "test-cache"))
TINY_NAME = "tiny-gemma"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """A base-models dir holding the converted embedded model, shared by the whole session."""
    from tunery.engine.base_models import DEFAULT_BASE_MODEL, BaseModelRegistry

    path = TEST_CACHE / "base_models"
    BaseModelRegistry(path).model_dir(DEFAULT_BASE_MODEL)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(models_dir: Path) -> Path:
    """A 2-layer, 64-wide random Gemma 3 with the real tokenizer: fast to train and decode."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    path = TEST_CACHE / "tiny-gemma"
    if (path / "config.json").exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "gemma-3-270m")
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def new_data_dir(data: Path, models_dir: Path, tiny_model_path: Path) -> Path:
    """Make `data` a data dir whose base_models links to the shared embedded-model cache and
    registers the tiny model."""
    from tunery.engine.base_models import BaseModelRegistry

    (data / "base_models").mkdir(parents=True)
    (data / "base_models" / "gemma-3-270m").symlink_to(models_dir / "gemma-3-270m")
    BaseModelRegistry(data / "base_models").register(TINY_NAME, tiny_model_path)
    return data


@pytest.fixture
def data_dir(tmp_path: Path, models_dir: Path, tiny_model_path: Path) -> Path:
    """A fresh data dir for one test (see `new_data_dir`)."""
    return new_data_dir(tmp_path / "data", models_dir, tiny_model_path)


@pytest.fixture(scope="session")
def make_data_dir(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_model_path: Path
) -> Callable[[], Path]:
    """For module- or session-scoped fixtures: each call returns a fresh data dir like
    `data_dir`'s."""

    def make() -> Path:
        return new_data_dir(tmp_path_factory.mktemp("data") / "data", models_dir, tiny_model_path)

    return make
