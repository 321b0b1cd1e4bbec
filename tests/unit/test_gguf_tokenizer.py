"""The SentencePiece tokenizer rebuilt from a GGUF: read, built, checked against transformers'."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tunery.engine import base_models, gguf_metadata, gguf_tokenizer, tokenizer_check
from tunery.engine.base_models import EMBEDDED_GGUF

MODEL = "gemma-3-270m"


@pytest.fixture(scope="module")
def reference(models_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models_dir / MODEL)


@pytest.fixture(scope="module")
def vocab(models_dir: Path) -> gguf_tokenizer.GgufVocab:
    # the GGUF is assembled into the model dir on first use: whichever test runs first
    base_models.BaseModelRegistry(models_dir).gguf_file(MODEL)
    found = gguf_tokenizer.read_vocab(models_dir / MODEL / EMBEDDED_GGUF)
    assert found is not None
    return found


def fresh_model_dir(tmp_path: Path, models_dir: Path) -> Path:
    """A converted model dir of the embedded model (its GGUF too) that has not been checked yet."""
    base_models.BaseModelRegistry(models_dir).gguf_file(MODEL)
    model_dir = tmp_path / MODEL
    model_dir.mkdir()
    for file in (models_dir / MODEL).iterdir():
        if file.is_file() and file.name not in (
            tokenizer_check.MODEL_FILE,
            tokenizer_check.CHECK_FILE,
        ):
            (model_dir / file.name).symlink_to(file)
    return model_dir


def test_gguf_metadata_reads_back_what_gguf_writer_wrote(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_uint32("test.count", 7)
    writer.add_int32("test.negative", -3)
    writer.add_float32("test.scale", 0.5)
    writer.add_bool("test.flag", True)
    writer.add_string("test.name", "ünïcödé ▁name")
    writer.add_array("test.words", ["a", "", "<0x0A>", "▁▁"])
    writer.add_array("test.numbers", [1.5, -2.0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    meta = gguf_metadata.read_metadata(path)
    assert meta["general.architecture"] == "llama"
    assert (meta["test.count"], meta["test.negative"], meta["test.scale"]) == (7, -3, 0.5)
    assert meta["test.flag"] is True and meta["test.name"] == "ünïcödé ▁name"
    assert meta["test.words"] == ["a", "", "<0x0A>", "▁▁"]
    assert meta["test.numbers"] == [1.5, -2.0]
    assert gguf_tokenizer.read_vocab(path) is None  # no tokenizer in it


def test_the_embedded_models_gguf_tokenizer_encodes_and_decodes_as_transformers_does(
    vocab: gguf_tokenizer.GgufVocab, reference: Any
) -> None:
    special = gguf_tokenizer.special_ids(vocab)
    ours = gguf_tokenizer.SentencePieceTokenizer(
        gguf_tokenizer.model_proto(vocab), vocab.add_bos, vocab.add_eos, special
    )
    assert tokenizer_check.first_mismatch(ours, reference, vocab) is None

    text = "Input: III\nOutput:<end_of_turn>  two   spaces 🙂"
    assert ours(text)["input_ids"] == reference(text)["input_ids"]
    assert ours(text)["input_ids"][0] == reference.bos_token_id
    assert ours(" IV", add_special_tokens=False).input_ids == [10935]
    assert ours(text, return_tensors="pt").input_ids.tolist() == [ours(text).input_ids]
    ids = ours(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == text.replace("<end_of_turn>", "")
    assert ours.decode(ids) == reference.decode(ids)
    names = ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id")
    assert [getattr(ours, n) for n in names] == [getattr(reference, n) for n in names]
    assert ours.convert_tokens_to_ids("<end_of_turn>") == reference.convert_tokens_to_ids(
        "<end_of_turn>"
    )
    assert ours.convert_tokens_to_ids(["<eos>", "▁IV"]) == reference.convert_tokens_to_ids(
        ["<eos>", "▁IV"]
    )
    assert len(ours) == len(reference) and ours.get_vocab() == reference.get_vocab()


def test_a_model_dir_is_checked_once_then_loads_the_sentencepiece_tokenizer(
    tmp_path: Path, models_dir: Path, reference: Any
) -> None:
    model_dir = fresh_model_dir(tmp_path, models_dir)
    cache = tmp_path / "cache"
    gguf = lambda: model_dir / EMBEDDED_GGUF  # noqa: E731
    first = base_models._load_tokenizer(model_dir, cache, MODEL, gguf)
    assert isinstance(first, gguf_tokenizer.SentencePieceTokenizer)
    check = json.loads((model_dir / tokenizer_check.CHECK_FILE).read_text())
    assert check["equal"] is True and check["why"] is None

    def no_gguf() -> Path:
        raise AssertionError("a checked model dir must not read its GGUF again")

    again = base_models._load_tokenizer(model_dir, tmp_path / "other-cache", MODEL, no_gguf)
    assert isinstance(again, gguf_tokenizer.SentencePieceTokenizer)
    assert not (tmp_path / "other-cache").exists()  # transformers' tokenizer was not needed
    text = "Output: ünïcödé<eos>"
    assert again(text)["input_ids"] == reference(text)["input_ids"]

    (model_dir / tokenizer_check.MODEL_FILE).write_bytes(b"torn")
    rebuilt = base_models._load_tokenizer(model_dir, cache, MODEL, gguf)
    assert rebuilt(text)["input_ids"] == reference(text)["input_ids"]  # checked again
    assert isinstance(
        base_models._load_tokenizer(model_dir, cache, MODEL, no_gguf),
        gguf_tokenizer.SentencePieceTokenizer,
    )


class Altered:
    """transformers' tokenizer with one thing changed: a model whose tokenizer the GGUF's vocab
    does not reproduce."""

    def __init__(self, tokenizer: Any, *, decode_off: bool = False, eos: int | None = None) -> None:
        self._tokenizer, self._decode_off = tokenizer, decode_off
        self.eos_token_id = tokenizer.eos_token_id if eos is None else eos

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        return self._tokenizer(text, **kwargs)

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        text: str = self._tokenizer.decode(ids, **kwargs)
        return text + "!" if self._decode_off and len(ids) == 3 else text


@pytest.mark.parametrize(
    ("change", "why"), [({"decode_off": True}, "decode"), ({"eos": 106}, "eos_token_id")]
)
def test_a_gguf_tokenizer_that_differs_from_transformers_is_recorded_and_not_used(
    tmp_path: Path, models_dir: Path, reference: Any, change: dict[str, Any], why: str
) -> None:
    model_dir = fresh_model_dir(tmp_path, models_dir)
    built = tokenizer_check.build_checked(
        model_dir / EMBEDDED_GGUF, Altered(reference, **change), model_dir
    )
    assert built is None
    check = json.loads((model_dir / tokenizer_check.CHECK_FILE).read_text())
    assert check["equal"] is False and check["why"].startswith(why)
    assert not (model_dir / tokenizer_check.MODEL_FILE).exists()
    assert tokenizer_check.load(model_dir) is None
    kept = base_models._load_tokenizer(model_dir, tmp_path / "cache", MODEL, lambda: None)
    assert not isinstance(kept, gguf_tokenizer.SentencePieceTokenizer)  # transformers' own


def test_a_check_is_redone_for_other_library_versions_and_an_unwritable_record_loses_only_speed(
    tmp_path: Path, models_dir: Path, reference: Any
) -> None:
    model_dir = fresh_model_dir(tmp_path, models_dir)
    (model_dir / tokenizer_check.CHECK_FILE).mkdir()  # the record cannot be written there
    built = tokenizer_check.build_checked(model_dir / EMBEDDED_GGUF, reference, model_dir)
    assert isinstance(built, gguf_tokenizer.SentencePieceTokenizer)  # this process uses it
    assert not tokenizer_check.is_checked(model_dir)

    (model_dir / tokenizer_check.CHECK_FILE).rmdir()
    assert tokenizer_check.build_checked(model_dir / EMBEDDED_GGUF, reference, model_dir)
    assert tokenizer_check.is_checked(model_dir)
    record = json.loads((model_dir / tokenizer_check.CHECK_FILE).read_text())
    record["stamp"] = ["transformers==0.0.1"]  # checked under another transformers
    (model_dir / tokenizer_check.CHECK_FILE).write_text(json.dumps(record))
    assert not tokenizer_check.is_checked(model_dir) and tokenizer_check.load(model_dir) is None
