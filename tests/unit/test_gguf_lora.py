"""A PEFT adapter as a GGUF LoRA for llama.cpp: the header llama.cpp checks, the tensor names
and shapes it looks up, PEFT's scaling folded into B, written once and again when the adapter
changes, and no file for an adapter that is not plain LoRA."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_generate import _load
from tunery.engine.fast_decode import FastGemma3
from tunery.engine.gguf_lora import GGUF_NAMES, write_gguf_lora
from tunery.engine.llamacpp import ADAPTER_GGUF, adapter_gguf

RANK, ALPHA = 4, 64


@pytest.fixture
def fast(tiny_model_path: Path) -> FastGemma3:
    return FastGemma3.of_model(_load(tiny_model_path).model)


@pytest.fixture
def adapter_dir(tiny_model_path: Path, tmp_path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(GGUF_NAMES), use_rslora=True)
    config.init_lora_weights = False
    get_peft_model(_load(tiny_model_path).model, config).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _fields(reader: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, field in reader.fields.items():  # type: ignore[attr-defined]
        value = field.parts[field.data[0]]
        out[name] = bytes(value).decode() if field.types[0].name == "STRING" else value[0]
    return out


def test_adapter_becomes_a_gguf_lora_llama_cpp_accepts(fast: FastGemma3, adapter_dir: Path) -> None:
    from gguf import GGUFReader

    path = adapter_gguf(adapter_dir, fast, "gemma3")
    assert path == adapter_dir / ADAPTER_GGUF
    reader = GGUFReader(str(path))
    fields = _fields(reader)
    assert fields["general.type"] == "adapter"
    assert fields["general.architecture"] == "gemma3"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(RANK)  # llama.cpp's scale: alpha/r = 1

    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    peft = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scaling = ALPHA / math.sqrt(RANK)  # rsLoRA
    layers = fast.n_layers
    assert len(tensors) == 2 * len(GGUF_NAMES) * layers
    for key, value in peft.items():
        _, _, rest = key.partition(".layers.")
        layer, _, rest = rest.partition(".")
        proj = rest.split(".")[1]
        name = f"blk.{layer}.{GGUF_NAMES[proj]}.weight"
        if ".lora_A." in key:
            got, want = tensors[f"{name}.lora_a"], value.float().numpy()
        else:
            got, want = tensors[f"{name}.lora_b"], value.float().numpy() * scaling
        assert got.shape == want.shape  # A (r, in), B (out, r): PEFT's own shapes
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_written_once_and_again_when_the_adapter_changes(
    fast: FastGemma3, adapter_dir: Path
) -> None:
    path = adapter_gguf(adapter_dir, fast, "gemma3")
    assert path is not None
    first = path.stat().st_mtime_ns
    assert adapter_gguf(adapter_dir, fast, "gemma3") == path
    assert path.stat().st_mtime_ns == first  # not rewritten

    weights = adapter_dir / "adapter_model.safetensors"
    later = first + 10**9
    os.utime(weights, ns=(later, later))  # a retrained adapter, same folder
    adapter_gguf(adapter_dir, fast, "gemma3")
    assert path.stat().st_mtime_ns > first
    assert not list(adapter_dir.glob(".*.tmp"))


def test_no_gguf_for_an_adapter_beyond_plain_lora(fast: FastGemma3, adapter_dir: Path) -> None:
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["rank_pattern"] = {"q_proj": 8}
    config_file.write_text(json.dumps(config))
    assert adapter_gguf(adapter_dir, fast, "gemma3") is None
    assert not (adapter_dir / ADAPTER_GGUF).exists()


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    weights = {(0, "q_proj"): (torch.zeros(2, 8), torch.zeros(8, 2))}
    with pytest.raises(ValueError, match="llama"):
        write_gguf_lora(weights, "llama", tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())
