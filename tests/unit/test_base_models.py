"""The base-model registry: names, registration rules, and a conversion cache that concurrent
first uses cannot corrupt."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tunery.engine import base_models, safetensors_layout
from tunery.engine.base_models import DEFAULT_BASE_MODEL, BaseModelRegistry
from tunery.engine.native import cpu_flags
from tunery.errors import InvalidArgument, NotFound


def test_embedded_model_is_listed_first_and_found_with_or_without_prefix(tmp_path: Path) -> None:
    registry = BaseModelRegistry(tmp_path)
    assert registry.list()[0].name == DEFAULT_BASE_MODEL
    assert registry.get("models/gemma-3-270m") == registry.get("gemma-3-270m")
    with pytest.raises(NotFound, match="models/nope"):
        registry.get("models/nope")


def test_register_hf_dir_persists_and_reads_limits(tmp_path: Path) -> None:
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    BaseModelRegistry(tmp_path / "models").register("mine", model, description="d")

    again = BaseModelRegistry(tmp_path / "models")  # a new process sees it
    info = again.get("models/mine")
    assert info.source == str(model.resolve()) and info.input_token_limit == 2048
    assert [i.name for i in again.list()] == [DEFAULT_BASE_MODEL, "mine"]
    assert again.model_dir("mine") == model.resolve()


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "gemma-3-270m", "x" * 0])
def test_register_refuses_bad_names(tmp_path: Path, name: str) -> None:
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(InvalidArgument):
        BaseModelRegistry(tmp_path / "models").register(name, model)


def test_register_refuses_paths_that_are_no_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    registry = BaseModelRegistry(tmp_path / "models")
    for path in (tmp_path / "missing", tmp_path / "notes.txt", tmp_path):
        with pytest.raises(InvalidArgument, match="not a .gguf file"):
            registry.register("x", path)


def test_concurrent_first_conversions_leave_one_whole_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The transformers dequantization is the slow edge; stand in a slow writer for it.
    def slow_convert(_gguf: Path, out: Path) -> None:
        out.mkdir()
        for i in range(5):
            (out / f"part{i}").write_text("x" * 1000)
            time.sleep(0.02)

    monkeypatch.setattr(base_models, "_convert_gguf", slow_convert)
    registry = BaseModelRegistry(tmp_path)
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(registry._converted("m", lambda work: work / "f.gguf"))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert results == [tmp_path / "m"] * 4
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "part0",
        "part1",
        "part2",
        "part3",
        "part4",
        "tunery-converted.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left behind


def test_loading_one_model_never_waits_for_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow load of "a" (a preload at start-up, say) must not hold up "b"; callers of the same
    # name share one load.
    release = threading.Event()
    loads: list[str] = []

    def fake_load(self: BaseModelRegistry, name: str) -> object:
        loads.append(name)
        if name == "a":
            assert release.wait(10)
        return f"loaded {name}"

    monkeypatch.setattr(BaseModelRegistry, "_load", fake_load)
    registry = BaseModelRegistry(tmp_path)
    results: list[object] = []
    slow = [threading.Thread(target=lambda: results.append(registry.load("a"))) for _ in range(2)]
    for t in slow:
        t.start()
    time.sleep(0.05)
    assert registry.load("b") == "loaded b"  # while "a" is still loading
    assert not registry.is_loaded("a") and registry.is_loaded("b")
    release.set()
    for t in slow:
        t.join()
    assert results == ["loaded a", "loaded a"]
    assert sorted(loads) == ["a", "b"]  # "a" loaded once for both callers


def test_tokenizer_loads_through_a_pickle_that_a_torn_file_cannot_break(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = base_models._cached_tokenizer(tiny_model_path, cache, "tiny")
    (pickled,) = cache.glob("tiny-*.pkl")
    again = base_models._cached_tokenizer(tiny_model_path, cache, "tiny")
    text = "Input: two hundred one\nOutput: 201 ünïcödé<eos> 🙂"
    assert again(text)["input_ids"] == first(text)["input_ids"]
    ids = first(text)["input_ids"]
    for skip in (False, True):
        assert again.decode(ids, skip_special_tokens=skip) == first.decode(
            ids, skip_special_tokens=skip
        )
    assert (again.eos_token_id, again.pad_token_id) == (first.eos_token_id, first.pad_token_id)
    assert len(again) == len(first) and again.get_vocab() == first.get_vocab()

    stale = cache / "tiny-0123456789abcdef.pkl"  # left by an older transformers, say
    stale.write_bytes(b"old")
    pickled.write_bytes(pickled.read_bytes()[:100])  # a crash mid-write of an older version
    rebuilt = base_models._cached_tokenizer(tiny_model_path, cache, "tiny")
    assert rebuilt(text)["input_ids"] == first(text)["input_ids"]
    assert pickled.stat().st_size > 100  # written whole again
    assert not stale.exists()  # replaced, not kept beside it


def test_a_registered_model_dir_is_left_untouched_by_the_tokenizer_cache(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    weights = tiny_model_path / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.stat().st_size)
    registry = BaseModelRegistry(tmp_path / "models")
    registry.register("tiny", tiny_model_path)
    registry.load("tiny")
    assert list((tmp_path / "models" / base_models.TOKENIZER_CACHE_DIR).glob("tiny-*.pkl"))
    assert not (tiny_model_path / base_models.TOKENIZER_CACHE_DIR).exists()
    assert (weights.stat().st_mtime_ns, weights.stat().st_size) == before  # nor aligned


def test_a_gemma_3_loads_from_its_files_and_builds_its_model_on_the_same_tensors(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    import torch

    from tunery.engine.fast_decode import FastGemma3

    registry = BaseModelRegistry(tmp_path / "models")
    registry.register("tiny", tiny_model_path)
    base = registry.load("tiny")
    assert base._model is None  # not built: serving the fast forward does not need it
    fast = FastGemma3(base.config, base.weights)
    ids = base.tokenizer("The capital of France is")["input_ids"]
    with torch.inference_mode():
        hidden = fast.prefill(ids, fast.new_cache(len(ids)), None)
        ours = fast.logits(hidden)

    model = base.model  # built now, around the loaded tensors
    for name, param in model.named_parameters():
        assert param.data_ptr() == base.weights[name].data_ptr(), name
    with torch.inference_mode():
        theirs = model(torch.tensor([ids])).logits[0, -1].float()
    assert int(ours.argmax()) == int(theirs.argmax())
    assert torch.allclose(ours[0], theirs, atol=0.05, rtol=0.02)
    assert base.model is model  # once


def test_weights_of_one_other_dtype_convert_in_one_pass_to_the_same_values(
    tmp_path: Path,
) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(7, 5, generator=g).bfloat16(),  # odd sizes: no alignment luck
        "a.weight": torch.randn(3, generator=g).bfloat16(),
        "c.scalar": torch.tensor(1.5).bfloat16(),
    }
    save_file(tensors, tmp_path / "one.safetensors")
    mixed = {**tensors, "d.ids": torch.arange(4)}  # two dtypes: converted one by one
    save_file(mixed, tmp_path / "mixed.safetensors")
    cpu = torch.device("cpu")
    for file, want in (("one", tensors), ("mixed", mixed)):
        got = base_models._read_weights([tmp_path / f"{file}.safetensors"], torch.float32, cpu)
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert got[name].dtype == torch.float32 and got[name].shape == tensor.shape
            assert torch.equal(got[name], tensor.float()), (file, name)
    whole = base_models._read_weights([tmp_path / "one.safetensors"], torch.float32, cpu)
    assert len({t.untyped_storage().data_ptr() for t in whole.values()}) == 1  # one buffer
    same = base_models._read_weights([tmp_path / "one.safetensors"], torch.bfloat16, cpu)
    assert all(torch.equal(same[n], t) for n, t in tensors.items())


def _misaligned_copy(src: Path, dst: Path) -> None:
    """`src` (a safetensors file) with its header padded to 16 bytes past a 64-byte line."""
    data = src.read_bytes()
    length = int.from_bytes(data[:8], "little")
    pad = (16 - (8 + length)) % 64
    header = data[8 : 8 + length] + b" " * pad
    dst.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + length :])
    assert safetensors_layout.data_start(dst) % 64 == 16


def test_aligning_a_safetensors_file_puts_its_tensors_on_lines_with_the_same_values(
    tmp_path: Path,
) -> None:
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(64, 48, generator=g).bfloat16(), "n": torch.randn(32)}
    save_file(tensors, tmp_path / "plain.safetensors", metadata={"note": "kept"})
    file = tmp_path / "model.safetensors"
    _misaligned_copy(tmp_path / "plain.safetensors", file)
    file.chmod(0o600)
    assert all(t.data_ptr() % 64 == 16 for t in load_file(file).values())

    assert safetensors_layout.align_data(file)
    assert safetensors_layout.data_start(file) % 64 == 0
    loaded = load_file(file)
    assert all(t.data_ptr() % 64 == 0 for t in loaded.values())  # mapped on lines
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        assert f.metadata() == {"note": "kept"}
    assert file.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "plain.safetensors"]
    stamp = file.stat().st_mtime_ns
    assert not safetensors_layout.align_data(file)  # already on a line: untouched
    assert file.stat().st_mtime_ns == stamp

    torn = tmp_path / "torn.safetensors"
    torn.write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_layout.align_data(torn)
    assert torn.read_bytes() == (1000).to_bytes(8, "little") + b"{}"


def test_a_model_dir_converted_before_alignment_loads_aligned_and_converts_aligned(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An older conversion of the embedded model (here the tiny model in its place): its weights
    # are rewritten on lines once, at load, and read the same.
    old = tmp_path / "models" / DEFAULT_BASE_MODEL
    shutil.copytree(tiny_model_path, old)
    _misaligned_copy(tiny_model_path / "model.safetensors", old / "model.safetensors")
    (old / base_models._CONVERTED_MARKER).write_text("{}")
    base = BaseModelRegistry(tmp_path / "models").load(DEFAULT_BASE_MODEL)
    assert safetensors_layout.data_start(old / "model.safetensors") % 64 == 0
    assert all(t.data_ptr() % 64 == 0 for t in base.weights.values())
    theirs = BaseModelRegistry(tmp_path / "registered")
    theirs.register("tiny", tiny_model_path)
    for name, tensor in theirs.load("tiny").weights.items():
        assert torch.equal(base.weights[name], tensor), name

    # a new conversion writes its weights on lines from the start
    def convert(_gguf: Path, out: Path) -> None:
        out.mkdir()
        _misaligned_copy(tiny_model_path / "model.safetensors", out / "model.safetensors")

    monkeypatch.setattr(base_models, "_convert_gguf", convert)
    monkeypatch.setattr(base_models, "_check_gguf_tokenizer", lambda _gguf, _out: None)
    path = BaseModelRegistry(tmp_path / "new")._converted("m", lambda work: work / "f.gguf")
    assert safetensors_layout.data_start(path / "model.safetensors") % 64 == 0


_RACE = """
import sys, threading
from tunery.engine.hf_imports import hf_name
names = [n.rpartition(".") for n in sys.argv[1:]]
start = threading.Barrier(len(names))
errors = []
def resolve(module, name):
    start.wait()
    try:
        hf_name(module, name)
    except Exception as e:
        errors.append(f"{module}.{name}: {type(e).__name__}: {e}")
threads = [threading.Thread(target=resolve, args=(m, n)) for m, _, n in names]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("; ".join(errors))
"""


def test_threads_importing_transformers_and_peft_names_at_once_all_get_them() -> None:
    # A fresh process: its first imports of these race. Without the lock, PEFT's import failed
    # in every try ("cannot import name 'AutoModel' from 'transformers'").
    names = [
        "transformers.AutoConfig",
        "transformers.AutoTokenizer",
        "transformers.AutoModelForCausalLM",
        "peft.PeftModel",
    ]
    run = subprocess.run(
        [sys.executable, "-c", _RACE, *names], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""


def test_a_cpu_runs_the_model_in_bf16_only_with_bf16_dot_products() -> None:
    """AVX-512 alone (Skylake-X: torch calls it "AVX512" too) emulates bf16 matmuls: fp32 there."""
    assert base_models.cpu_multiplies_bf16(frozenset({"avx512f", "avx512bw", "avx512_bf16"}))
    assert base_models.cpu_multiplies_bf16(frozenset({"avx512f", "amx_tile", "amx_bf16"}))
    assert not base_models.cpu_multiplies_bf16(frozenset({"avx2", "avx512f", "avx512bw"}))
    assert not base_models.cpu_multiplies_bf16(frozenset({"avx2", "fma"}))
    flags = cpu_flags()
    if platform.machine() == "x86_64" and Path("/proc/cpuinfo").exists():
        assert flags is not None and "sse2" in flags
    want = torch.bfloat16 if base_models.cpu_multiplies_bf16(flags) else torch.float32
    assert base_models.pick_dtype(torch.device("cpu")) == want
