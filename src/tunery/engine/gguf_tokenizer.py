"""A SentencePiece tokenizer rebuilt from a GGUF's own vocab, used once it encodes and decodes as
transformers' tokenizer of the same model does on a probe set (checked once per model dir).

transformers builds Gemma's 262k-token BPE from a 33 MB tokenizer.json, 515k merges included:
~2.5 s of every process start, all of it holding the GIL. The GGUF holds the SentencePiece vocab
(pieces, scores, types) that those merges were derived from; SentencePiece loads it in ~0.1 s.
`tokenizer_check` decides, per model dir, whether this one stands in for transformers'.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunery.engine.gguf_metadata import read_metadata

# SentencePiece piece types (sentencepiece_model.proto; GGUF's token_type uses the same numbers).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
_BPE = 2


@dataclass(frozen=True)
class GgufVocab:
    pieces: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool


def read_vocab(gguf_path: Path) -> GgufVocab | None:
    """The SentencePiece vocab of a GGUF (`tokenizer.ggml.model` "llama", no merges), else None."""
    meta = read_metadata(gguf_path)

    def get(key: str, default: Any) -> Any:
        return meta.get(f"tokenizer.ggml.{key}", default)

    if get("model", None) != "llama" or "tokenizer.ggml.merges" in meta:
        return None
    pieces, scores, types = get("tokens", None), get("scores", None), get("token_type", None)
    if not (pieces and scores and types and len(pieces) == len(scores) == len(types)):
        return None
    return GgufVocab(
        pieces=list(pieces),
        scores=[float(s) for s in scores],
        types=[int(t) for t in types],
        bos_id=int(get("bos_token_id", -1)),
        eos_id=int(get("eos_token_id", -1)),
        unk_id=int(get("unknown_token_id", 0)),
        pad_id=int(get("padding_token_id", -1)),
        add_bos=bool(get("add_bos_token", True)),
        add_eos=bool(get("add_eos_token", False)),
        add_space_prefix=bool(get("add_space_prefix", True)),
    )


def model_proto(vocab: GgufVocab) -> bytes:
    """A serialized SentencePiece BPE `ModelProto` for `vocab`.

    Where the GGUF differs from the SentencePiece model transformers' tokenizer stands for:
    - user-defined pieces that hold spaces (Gemma's runs of 2-31 spaces) are plain vocab there,
      with "▁" for the space and merged before any other piece, so they become NORMAL pieces
      scored above every other one, in id order;
    - the unknown piece is typed CONTROL in the GGUF; SentencePiece wants it UNKNOWN.
    """
    top = max(
        (s for s, t in zip(vocab.scores, vocab.types, strict=True) if t == NORMAL), default=0.0
    )
    out = bytearray()
    for i, (piece, score, kind) in enumerate(
        zip(vocab.pieces, vocab.scores, vocab.types, strict=True)
    ):
        if kind == USER_DEFINED and " " in piece:
            piece, score, kind = piece.replace(" ", "\u2581"), top + len(vocab.pieces) - i, NORMAL
        if i == vocab.unk_id:
            kind = UNKNOWN
        body = _string(1, piece) + _tag(2, 5) + struct.pack("<f", score) + _varint_field(3, kind)
        out += _bytes(1, body)
    trainer = _varint_field(3, _BPE) + _varint_field(4, len(vocab.pieces))
    trainer += _varint_field(35, 1)  # byte_fallback
    # The special ids, and their pieces: SentencePiece finds each id by its piece's name.
    ids = (vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.pad_id)
    for number, i in enumerate(ids, start=40):
        trainer += _varint_field(number, i)
        if 0 <= i < len(vocab.pieces):
            trainer += _string(number + 5, vocab.pieces[i])
    normalizer = _string(1, "identity") + _varint_field(3, int(vocab.add_space_prefix))
    normalizer += _varint_field(4, 0) + _varint_field(5, 1)  # keep spaces as they are, as "▁"
    return bytes(out + _bytes(2, trainer) + _bytes(3, normalizer))


class SentencePieceTokenizer:
    """The slice of transformers' tokenizer API that Tunery uses, over a SentencePiece model.

    Control pieces (`<start_of_turn>`, ...) written in the text are matched whole and longest
    first, as transformers matches its added tokens; SentencePiece itself only knows them as ids.
    """

    def __init__(
        self, proto: bytes, add_bos: bool, add_eos: bool, special_ids: Iterable[int]
    ) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(proto)
        sp = self._sp
        self.bos_token_id = _id_or_none(sp.bos_id())
        self.eos_token_id = _id_or_none(sp.eos_id())
        self.unk_token_id = _id_or_none(sp.unk_id())
        self.pad_token_id = _id_or_none(sp.pad_id())
        self._prefix = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        self._suffix = [self.eos_token_id] if add_eos and self.eos_token_id is not None else []
        self._special = {i: sp.IdToPiece(i) for i in special_ids}
        self._size = int(sp.GetPieceSize())
        byte_ids = {sp.PieceToId(f"<0x{b:02X}>"): b for b in range(256)}
        self._bytes = {i: b for i, b in byte_ids.items() if sp.IsByte(i)}
        self._special_ids = {piece: i for i, piece in self._special.items() if piece}
        # Where a control piece may start: one of their first characters (for Gemma, "<").
        starts = sorted({piece[0] for piece in self._special_ids})
        self._start = re.compile("|".join(map(re.escape, starts)) or r"(?!)")
        self._lengths = sorted({len(piece) for piece in self._special_ids}, reverse=True)

    def __len__(self) -> int:
        return self._size

    def __call__(
        self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None
    ) -> Encoding:
        ids = self.encode(text, add_special_tokens)
        if return_tensors == "pt":
            import torch

            return Encoding(input_ids=torch.tensor([ids]))
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        return Encoding(input_ids=ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        start = 0
        for at, piece in self._special_spans(text):
            ids += self._sp.EncodeAsIds(text[start:at]) if at > start else []
            ids.append(self._special_ids[piece])
            start = at + len(piece)
        if start < len(text):
            ids += self._sp.EncodeAsIds(text[start:])
        return self._prefix + ids + self._suffix if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`. A run of byte pieces that is not whole UTF-8 gives one U+FFFD per
        byte, as transformers' ByteFallback decoder does (SentencePiece keeps the valid head)."""
        parts: list[str] = []
        run: list[int] = []  # plain pieces
        raw = bytearray()  # consecutive byte pieces
        for i in (int(i) for i in ids):
            if not 0 <= i < self._size:  # no such piece: no text, as transformers gives
                continue
            byte = self._bytes.get(i)
            if byte is not None:
                if run:
                    parts.append(self._sp.DecodeIds(run))
                    run = []
                raw.append(byte)
                continue
            if raw:
                parts.append(_utf8_or_replacements(raw))
                raw = bytearray()
            if i in self._special:
                if not skip_special_tokens:
                    parts += [self._sp.DecodeIds(run), self._special[i]]
                    run = []
            else:
                run.append(i)
        parts.append(_utf8_or_replacements(raw) if raw else self._sp.DecodeIds(run))
        return "".join(parts)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return int(self._sp.PieceToId(tokens))
        return [int(self._sp.PieceToId(t)) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return {self._sp.IdToPiece(i): i for i in range(len(self))}

    def _special_spans(self, text: str) -> Iterable[tuple[int, str]]:
        """(position, piece) of each control piece written in `text`, leftmost-longest."""
        at = 0
        while (found := self._start.search(text, at)) is not None:
            at = found.start()
            piece = next(
                (
                    text[at : at + n]
                    for n in self._lengths
                    if text[at : at + n] in self._special_ids
                ),
                None,
            )
            if piece is None:
                at += 1
                continue
            yield at, piece
            at += len(piece)


class Encoding(dict[str, Any]):
    """`tokenizer(text)`'s result: `["input_ids"]` and `.input_ids`, as transformers gives."""

    @property
    def input_ids(self) -> Any:
        return self["input_ids"]


def special_ids(vocab: GgufVocab) -> list[int]:
    """The ids transformers treats as special tokens: control pieces and the unknown one."""
    return [i for i, t in enumerate(vocab.types) if t == CONTROL or i == vocab.unk_id]


def _utf8_or_replacements(raw: bytes | bytearray) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(raw)


def _id_or_none(i: int) -> int | None:
    return i if i >= 0 else None


# -- protobuf wire format: just what a ModelProto needs ------------------------------------------
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32s are ten bytes, two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _varint_field(number: int, value: int) -> bytes:
    return _tag(number, 0) + _varint(value)


def _bytes(number: int, data: Sequence[int]) -> bytes:
    return _tag(number, 2) + _varint(len(data)) + bytes(data)


def _string(number: int, text: str) -> bytes:
    return _bytes(number, text.encode("utf-8"))
