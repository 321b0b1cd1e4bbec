"""Whether a GGUF's rebuilt SentencePiece tokenizer (`gguf_tokenizer`) stands in for
transformers' tokenizer of the same model: checked once per model dir on a probe set (encode and
decode, special tokens and all), the outcome kept beside the model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

from tunery.engine.gguf_tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    GgufVocab,
    SentencePieceTokenizer,
    model_proto,
    read_vocab,
    special_ids,
)

log = logging.getLogger(__name__)

MODEL_FILE = "tokenizer.spm"
CHECK_FILE = "tunery-tokenizer.json"
_CHECK_FORMAT = 1


def load(model_dir: Path) -> SentencePieceTokenizer | None:
    """The model dir's checked SentencePiece tokenizer; None where it has none."""
    check = _read_check(model_dir)
    if not check or not check.get("equal"):
        return None
    try:
        proto = (model_dir / MODEL_FILE).read_bytes()
        return SentencePieceTokenizer(proto, check["add_bos"], check["add_eos"], check["special"])
    except Exception:  # a torn file, a foreign record: check it again
        log.warning("%s: unreadable; checking it again", model_dir / MODEL_FILE, exc_info=True)
        with contextlib.suppress(OSError):
            (model_dir / CHECK_FILE).unlink(missing_ok=True)
        return None


def is_checked(model_dir: Path) -> bool:
    return _read_check(model_dir) is not None


def build_checked(
    gguf_path: Path, reference: Any, model_dir: Path
) -> SentencePieceTokenizer | None:
    """Build the SentencePiece tokenizer from `gguf_path`, compare it with `reference` on the
    probes, and record the outcome in `model_dir` (where it can be written: a read-only dir
    only loses the speed-up); the tokenizer when they agree on all."""
    tokenizer: SentencePieceTokenizer | None = None
    why: str | None
    record: dict[str, Any] = {"format": _CHECK_FORMAT, "stamp": _stamp()}
    try:
        vocab = read_vocab(gguf_path)
        if vocab is None:
            why = "not a SentencePiece vocab without merges"
        else:
            proto, special = model_proto(vocab), special_ids(vocab)
            tokenizer = SentencePieceTokenizer(proto, vocab.add_bos, vocab.add_eos, special)
            why = first_mismatch(tokenizer, reference, vocab)
            if why is None:
                _write(model_dir / MODEL_FILE, proto)
            record |= {"add_bos": vocab.add_bos, "add_eos": vocab.add_eos, "special": special}
    except Exception as e:  # any failure only keeps transformers' tokenizer
        why = f"{type(e).__name__}: {e}"
    if why is not None:
        log.info("%s: transformers' tokenizer stays (%s)", model_dir.name, why)
    try:
        _write(
            model_dir / CHECK_FILE, json.dumps(record | {"equal": why is None, "why": why}).encode()
        )
    except OSError:
        log.warning("could not record the tokenizer check in %s", model_dir, exc_info=True)
    return tokenizer if why is None else None


def first_mismatch(tokenizer: Any, reference: Any, vocab: GgufVocab) -> str | None:
    """The first probe on which the two tokenizers differ (encode, with and without the
    special tokens, and decode, with and without skipping them; the special ids), or None."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(tokenizer, name) != getattr(reference, name, None):
            return f"{name}: {getattr(tokenizer, name)} vs {getattr(reference, name, None)}"
    if len(tokenizer) != len(reference):
        return f"vocab size: {len(tokenizer)} vs {len(reference)}"
    texts, id_runs = probes(vocab)
    for text in texts:
        for special in (False, True):
            ours = tokenizer(text, add_special_tokens=special)["input_ids"]
            theirs = list(reference(text, add_special_tokens=special)["input_ids"])
            if ours != theirs:
                return f"encode {text[:40]!r}: {ours[:8]} vs {theirs[:8]}"
    for ids in id_runs:
        for skip in (True, False):
            ours_text = tokenizer.decode(ids, skip_special_tokens=skip)
            theirs_text = reference.decode(ids, skip_special_tokens=skip)
            if ours_text != theirs_text:
                return f"decode {ids[:8]}: {ours_text[:40]!r} vs {theirs_text[:40]!r}"
    return None


_PROBE_TEXTS = (
    "Input: III\nOutput:",
    " IV",
    "  leading   and trailing spaces  ",
    " " * 50 + "x" + " " * 33,
    "tabs\tand\t\tnewlines\n\n\n\r\n end",
    "héllo wörld, naïve café; Ǆ ﬁ ligatures",
    "日本語のテキスト、こんにちは世界。中文字符",
    "Привет, мир! مرحبا بالعالم नमस्ते दुनिया",
    "emoji 😀🎉👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, \u200b zero width",
    "\x00\x01 control characters \x7f",
    "def f(x):\n    return {'a': [1, 2.5e-3, -42]}  # code\n",
    "<b>html</b> <div class='x'>&amp;</div> <table><tr><td>1</td></tr></table>",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "a<mask>b<unk><pad>c<bos><eos>",
    "<<start_of_turn>> <start_of_turn <end_of_turn>>",
    "1234567890 3.14159 0x1F 1e10",
    "a" * 300,
)


def probes(vocab: GgufVocab) -> tuple[list[str], list[list[int]]]:
    """Fixed texts, texts of random vocab pieces (every control and user-defined piece among
    them), and random id runs to decode (bytes, control pieces and all)."""
    rng = random.Random(0)
    size = len(vocab.pieces)
    surface = [p.replace("\u2581", " ") for p in vocab.pieces]
    plain = [i for i, t in enumerate(vocab.types) if t == NORMAL]
    special = [i for i, t in enumerate(vocab.types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
    texts = list(_PROBE_TEXTS)
    for _ in range(1500):
        texts.append("".join(surface[rng.choice(plain)] for _ in range(rng.randrange(1, 24))))
    for start in range(0, len(special), 64):
        chunk = special[start : start + 64]
        texts.append(" ".join(surface[i] + surface[rng.choice(plain)] for i in chunk))
    id_runs = [[rng.randrange(size) for _ in range(rng.randrange(1, 16))] for _ in range(1500)]
    bytes_ = [i for i, t in enumerate(vocab.types) if t == BYTE]
    for _ in range(300):  # UTF-8 split over byte pieces, whole or cut short
        encoded = rng.choice(_PROBE_TEXTS).encode()[: rng.randrange(1, 24)]
        id_runs.append([bytes_[b] for b in encoded] if len(bytes_) == 256 else [])
    return texts, [run for run in id_runs if run]


def _read_check(model_dir: Path) -> dict[str, Any] | None:
    try:
        check: dict[str, Any] = json.loads((model_dir / CHECK_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(check, dict) or check.get("format") != _CHECK_FORMAT:
        return None
    # Another transformers, tokenizers or sentencepiece may tokenize otherwise: check again.
    return check if check.get("stamp") == _stamp() else None


def _stamp() -> list[str]:
    """The versions of the libraries on either side of the check."""
    from importlib.metadata import PackageNotFoundError, version

    stamp = []
    for dist in ("transformers", "tokenizers", "sentencepiece"):
        try:
            stamp.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            stamp.append(f"{dist} missing")
    return stamp


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
