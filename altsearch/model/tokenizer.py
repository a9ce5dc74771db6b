"""The XLM-R tokenizer of the AltCLIP text tower, run by the ``tokenizers`` library alone.

Ids follow fairseq's XLM-R dictionary: ``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3, then
SentencePiece piece *i* (i >= 3) is id *i* + 1, and ``<mask>`` is the last id. Every text is
encoded as ``<s> pieces </s>``, truncated to ``max_length`` with ``</s>`` kept last, and a batch
is right-padded with ``<pad>`` to its longest row: the ids of transformers 5's
``XLMRobertaTokenizer.from_pretrained(...)(texts, padding=True, truncation=True, max_length=...)``.
Whitespace is split as sentencepiece splits it, so trailing or only whitespace adds no token (a
hub tokenizer.json run as-is would add a "▁"; see ``_split_whitespace_first``).

Building the whole Unigram model (250,002 pieces) takes ``tokenizers`` about half a second, which a
one-query process need not pay: :meth:`Tokenizer.from_dir` starts from a piece table cached for the
tokenizer file (:mod:`.pieces`), which encodes a few texts with the same ids.

A model folder normally ships ``tokenizer.json``. Folders that only carry the SentencePiece
``sentencepiece.bpe.model`` (BAAI/AltCLIP-m9) are converted in memory: the ``.model`` protobuf
is read by the small wire-format reader below, so neither ``protobuf`` nor ``sentencepiece`` is
needed at run time.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import Unigram

from altsearch.errors import TokenizerError

from . import pieces as P
from .pieces import PieceTable

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 77  # what BAAI's own AltCLIP inference uses
TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "sentencepiece.bpe.model"

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
METASPACE = "\u2581"

PIECES_ENV = "ALTSEARCH_PIECE_TABLE"  # "0": Model builds the whole tokenizer model, as before the table
PIECES_CALLS = 16  # encode() calls answered from the piece table before the whole model is built
PIECES_MAX_CHARS = 4_000  # a batch of more characters builds the whole model at once


class Tokenizer:
    """Batches of texts -> ``(input_ids, attention_mask)`` int64 tensors for the text tower.

    Made by :meth:`from_dir`, it answers its first calls from a :class:`~.pieces.PieceTable`
    (the pieces each batch contains, the same ids) and builds the whole model on the
    ``PIECES_CALLS + 1``-th call, on a batch of over ``PIECES_MAX_CHARS`` characters, or on
    :meth:`load`: a process that asks a few queries never pays for building it.
    """

    def __init__(self, backend: _Backend | None, max_length: int = DEFAULT_MAX_LENGTH, *,
                 pieces: PieceTable | None = None, load: Callable[[], _Backend] | None = None) -> None:
        """Wrap a ``tokenizers.Tokenizer``; its padding and truncation settings are replaced. Or, with
        ``backend`` None, encode from ``pieces`` until ``load()`` is called for the whole one."""
        if max_length < 3:
            raise ValueError(f"max_length must be at least 3 (<s>, one piece, </s>), got {max_length}")
        self.max_length = max_length
        self._lock = threading.Lock()
        self._backend: _Backend | None = None
        self._pieces = pieces
        self._load = load
        self._piece_calls = 0
        if backend is not None:
            self._use(backend)
            return
        if pieces is None or load is None:
            raise ValueError("a Tokenizer needs a backend, or pieces and a function that loads the backend")
        _check_pipeline(pieces.shell, pieces.pad_id)
        _split_whitespace_first(pieces.shell)
        self.pad_id = pieces.pad_id
        self._vocab_size = pieces.vocab_size

    def _use(self, backend: _Backend) -> None:
        pad_id = backend.token_to_id(PAD)
        _check_pipeline(backend, pad_id)
        self._configure(backend, pad_id)
        self.pad_id = pad_id
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._backend = backend

    def _configure(self, backend: _Backend, pad_id: int) -> None:
        _split_whitespace_first(backend)
        backend.enable_truncation(max_length=self.max_length, strategy="longest_first", direction="right")
        backend.enable_padding(direction="right", pad_id=pad_id, pad_token=PAD)

    @property
    def whole_model(self) -> bool:
        """Whether the whole Unigram model is built (else batches are encoded from the piece table)."""
        return self._backend is not None

    def load(self) -> Tokenizer:
        """Build the whole model now (a long-lived process's queries then skip the piece lookup)."""
        with self._lock:
            if self._backend is None:
                self._use(self._load())
        return self

    @classmethod
    def from_str(
        cls, json_text: str, max_length: int = DEFAULT_MAX_LENGTH, *, source: str = "tokenizer.json text"
    ) -> Tokenizer:
        """A tokenizer from the text of a ``tokenizer.json``; ``source`` names it in errors."""
        return cls(_parse_backend(json_text, source), max_length)

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = DEFAULT_MAX_LENGTH) -> Tokenizer:
        """A tokenizer from a ``tokenizer.json`` file (the whole model, built now)."""
        return cls(_read_backend(Path(path)), max_length)

    @classmethod
    def from_dir(cls, folder: str | Path, max_length: int = DEFAULT_MAX_LENGTH, *, pieces: bool = True) -> Tokenizer:
        """``tokenizer.json`` from ``folder``, else its ``sentencepiece.bpe.model`` converted in memory.

        With ``pieces`` (the default) the tokenizer starts from the piece table cached for that file
        (written on first use) where the tokenizer's layout allows it: see the class docstring."""
        folder = Path(folder)
        if (folder / TOKENIZER_JSON).is_file():
            source = folder / TOKENIZER_JSON
            load = partial(_read_backend, source)
        elif (folder / SENTENCEPIECE_MODEL).is_file():
            source = folder / SENTENCEPIECE_MODEL

            def load() -> _Backend:
                log.info("no %s in %s: converting %s", TOKENIZER_JSON, folder, SENTENCEPIECE_MODEL)
                return _build_backend(_read_spm(source))
        else:
            raise TokenizerError(
                f"no tokenizer in {folder}: looked for {TOKENIZER_JSON} and {SENTENCEPIECE_MODEL}"
            )
        if not pieces:
            return cls(load(), max_length)
        table, backend = _piece_table(source, load)
        if table is None:
            return cls(backend or load(), max_length)
        tokenizer = cls(None, max_length, pieces=table, load=load)
        if backend is not None:
            tokenizer._use(backend)
        return tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens (``<mask>``) included: 250,002 for XLM-R."""
        return self._vocab_size

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, int64 ``(B, T)``, T = longest row (at most max_length)."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not a single str")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):  # a tuple would be encoded as a pair
            raise TypeError("encode() takes a sequence of str")
        if not texts:
            empty = torch.zeros((0, 0), dtype=torch.int64)
            return empty, empty.clone()
        backend = self._backend
        if backend is None:
            with self._lock:
                if self._backend is None and (self._piece_calls >= PIECES_CALLS
                                              or sum(map(len, texts)) > PIECES_MAX_CHARS):
                    self._use(self._load())
                backend = self._backend
                self._piece_calls += backend is None
            if backend is None:
                try:
                    return self._encode_from_pieces(texts)
                except Exception as exc:  # input the whole model refuses too (a lone surrogate): its own error
                    log.debug("encoding from the piece table failed (%s): building the whole model", exc)
                    backend = self.load()._backend
        return _tensors(backend.encode_batch(texts))

    def _encode_from_pieces(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        backend, table = self._pieces.backend(texts)
        self._configure(backend, self._pieces.position(self.pad_id))
        ids, mask = _tensors(backend.encode_batch(texts))
        return torch.from_numpy(table)[ids], mask  # the partial model's ids -> the whole model's


def _tensors(encodings) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)  # (B, T)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)  # (B, T)
    return ids, mask


def _check_pipeline(backend: _Backend, pad_id: int | None) -> None:
    if pad_id is None:
        raise TokenizerError(f"the tokenizer has no {PAD} token; it is not an XLM-R tokenizer")
    if backend.post_processor is None:
        raise TokenizerError(f"the tokenizer adds no {BOS}/{EOS} (no post_processor); it is not an XLM-R tokenizer")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read tokenizer file {path}: {_first_line(exc)}") from exc


def _parse_backend(json_text: str, source: str) -> _Backend:
    try:
        return _Backend.from_str(json_text)
    except Exception as exc:  # tokenizers raises a plain Exception from Rust for any bad input
        raise TokenizerError(f"{source} is not a valid tokenizer.json: {_first_line(exc)}") from exc


def _read_backend(path: Path) -> _Backend:
    return _parse_backend(_read_text(path), str(path))


def _piece_table(source: Path, load: Callable[[], _Backend]) -> tuple[PieceTable | None, _Backend | None]:
    """The piece table of the tokenizer in ``source``, from the cache or built (and cached) now; and
    the whole backend where building the table needed it (a sentencepiece model is converted first).
    (None, the whole backend or None) when the tokenizer's layout does not allow a table, or its file
    is unreadable or invalid: a tokenizer.json already read is parsed into the whole model here (a bad
    one raises the TokenizerError it always did); else the caller loads it."""
    try:
        key, cache = P.source_key(source), P.cache_path(source)
    except OSError:
        return None, None
    table = P.PieceTable.load(cache, key)
    if table is not None:
        return table, None
    backend = text = None
    try:
        if source.name == TOKENIZER_JSON:
            text = _read_text(source)
            doc = json.loads(text)
        else:
            backend = load()
            doc = json.loads(backend.to_str())
        table = P.PieceTable.from_document(doc)
    except Exception as exc:  # a layout it cannot serve (Unsupported), not JSON, or not a tokenizer's
        log.debug("no piece table for %s: %s", source, _first_line(exc))
        if backend is None and text is not None:  # the whole model from the text read (its errors as ever)
            backend = _parse_backend(text, str(source))
        return None, backend
    try:
        table.save(cache, key)
    except OSError as exc:  # a read-only home: the table still serves this process
        log.debug("cannot cache the piece table of %s in %s: %s", source, cache, exc)
    return table, backend


def _split_whitespace_first(backend: _Backend) -> None:
    """Split on whitespace before a bare Metaspace pre-tokenizer, as transformers 5 does for XLM-R.

    The hub's tokenizer.json (written by transformers 4.x) runs Metaspace on the whole text, so
    trailing whitespace becomes an extra "▁" token and "   " encodes as <s> ▁ </s>.
    Splitting on whitespace first gives sentencepiece's answer (trailing and repeated whitespace
    dropped) and the ids of transformers 5's ``XLMRobertaTokenizer.from_pretrained``. Ordinary
    texts without trailing whitespace get the same ids either way; the two differ only on
    whitespace at the end, before a special token, or that the charsmap keeps (U+0085).
    """
    if isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace):
        split = pre_tokenizers.WhitespaceSplit()
        backend.pre_tokenizer = pre_tokenizers.Sequence([split, backend.pre_tokenizer])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- SentencePiece .model -> tokenizer.json ----------------------------------------------------

# sentencepiece_model.proto: SentencePiece.Type and TrainerSpec.ModelType values used here.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_UNIGRAM = 1


class _WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


class _Piece(NamedTuple):  # a NamedTuple, not a dataclass: 250k of them are built per model
    piece: str
    score: float
    type: int


@dataclass(frozen=True)
class _SpmModel:
    """The fields of a sentencepiece ``ModelProto`` that the conversion needs (proto2 defaults)."""

    pieces: tuple[_Piece, ...]
    model_type: int = _UNIGRAM
    byte_fallback: bool = False
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, next position)."""
    if pos < len(buf) and buf[pos] < 0x80:  # fast path: one byte
        return buf[pos], pos + 1
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise _WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _WireError("varint longer than 10 bytes")


def _read_value(buf: bytes, pos: int, key: int, end: int | None = None) -> tuple[int | bytes, int]:
    """The value of the field whose key ends at ``pos`` (within ``buf[:end]``): an int for varints,
    else raw bytes; and the position after it."""
    number, wire = key >> 3, key & 7
    if number == 0:
        raise _WireError("field number 0")
    if wire == 0:
        return _varint(buf, pos)
    if wire == 2:
        size, pos = _varint(buf, pos)
    elif wire in (1, 5):
        size = 8 if wire == 1 else 4
    else:
        raise _WireError(f"unsupported wire type {wire} (field {number})")
    if pos + size > (len(buf) if end is None else end):
        raise _WireError(f"field {number} runs past the end of its message")
    return buf[pos:pos + size], pos + size


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        value, pos = _read_value(buf, pos, key)
        yield key >> 3, value


# Keys (field number << 3 | wire type) read on the hot path: ModelProto.pieces (bytes) and
# SentencePiece.piece (bytes), .score (float), .type (enum).
_MODEL_PIECE = _PIECE_TEXT = 0x0A
_PIECE_SCORE, _PIECE_TYPE = 0x15, 0x18
_FLOAT32 = struct.Struct("<f")


def _parse_piece(buf: bytes, pos: int, end: int) -> _Piece:
    """The ``SentencePiece`` message in ``buf[pos:end]``, its usual keys decoded inline."""
    piece, score, kind = None, 0.0, _NORMAL
    while pos < end:
        key = buf[pos]
        if key == _PIECE_TEXT:
            size, pos = _varint(buf, pos + 1)
            if pos + size > end:
                raise _WireError("a piece runs past the end of its message")
            piece, pos = buf[pos:pos + size].decode("utf-8"), pos + size
        elif key == _PIECE_SCORE and pos + 5 <= end:
            score, pos = _FLOAT32.unpack_from(buf, pos + 1)[0], pos + 5
        elif key == _PIECE_TYPE:
            kind, pos = _varint(buf, pos + 1)
        else:  # a field this reader does not use, or a malformed one: skip it or fail
            key, pos = _varint(buf, pos)
            _, pos = _read_value(buf, pos, key, end)
    if pos != end:
        raise _WireError("a piece runs past the end of its message")
    if piece is None:
        raise _WireError("a piece without text")
    return _Piece(piece, score, kind)


def _parse_spm(data: bytes) -> _SpmModel:
    """Pieces (1), trainer_spec (2) and normalizer_spec (3) of a ``ModelProto``.

    The 250k pieces of XLM-R are parsed in place, without copying sub-messages (about a second).
    """
    pieces, trainer, normalizer = [], {}, {}
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == _MODEL_PIECE:
            size, pos = _varint(data, pos + 1)
            if pos + size > end:
                raise _WireError("a piece runs past the end of the data")
            pieces.append(_parse_piece(data, pos, pos + size))
            pos += size
            continue
        key, pos = _varint(data, pos)
        value, pos = _read_value(data, pos, key)
        if key >> 3 == 2:
            trainer.update(_fields(_as_bytes(value)))
        elif key >> 3 == 3:
            normalizer.update(_fields(_as_bytes(value)))
    return _SpmModel(
        pieces=tuple(pieces),
        model_type=_as_int(trainer.get(3, _UNIGRAM)),
        byte_fallback=bool(_as_int(trainer.get(35, 0))),
        precompiled_charsmap=_as_bytes(normalizer.get(2, b"")),
        add_dummy_prefix=bool(_as_int(normalizer.get(3, 1))),
        remove_extra_whitespaces=bool(_as_int(normalizer.get(4, 1))),
    )


def _as_bytes(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise _WireError("a field has the wrong wire type")
    return value


def _as_int(value: int | bytes) -> int:
    if not isinstance(value, int):
        raise _WireError("a field has the wrong wire type")
    return value


def _read_spm(path: Path) -> _SpmModel:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"cannot read sentencepiece model {path}: {_first_line(exc)}") from exc
    try:
        model = _parse_spm(data)
    except (_WireError, UnicodeDecodeError, struct.error) as exc:
        raise TokenizerError(f"{path} is not a sentencepiece model: {exc}") from exc
    _check_xlmr_layout(model, path)
    return model


def _check_xlmr_layout(model: _SpmModel, path: Path) -> None:
    """The fairseq id mapping assumes spm's default layout: <unk>, <s>, </s>, then the pieces."""
    if model.model_type != _UNIGRAM:
        raise TokenizerError(f"{path} is not a Unigram sentencepiece model (model_type {model.model_type})")
    types = [p.type for p in model.pieces[:3]]
    if len(model.pieces) < 4 or types != [_UNKNOWN, _CONTROL, _CONTROL]:
        raise TokenizerError(
            f"{path} does not have the XLM-R piece layout (<unk>, <s>, </s>, pieces...): "
            f"{len(model.pieces)} pieces, first types {types}"
        )
    if any(p.type == _UNKNOWN for p in model.pieces[3:]):
        raise TokenizerError(f"{path} has more than one <unk> piece")
    if not (model.add_dummy_prefix and model.remove_extra_whitespaces):
        raise TokenizerError(
            f"{path} uses add_dummy_prefix={model.add_dummy_prefix}, "
            f"remove_extra_whitespaces={model.remove_extra_whitespaces}; "
            "only the XLM-R settings (both true) are supported"
        )
    if model.byte_fallback:
        log.warning("%s uses byte fallback, which XLM-R does not: unknown characters become <unk>", path)


def _build_backend(model: _SpmModel) -> _Backend:
    """The pipeline transformers 5 builds for XLM-R from a ``.model``: fairseq vocabulary,
    Precompiled normaliser, WhitespaceSplit + Metaspace, ``<s> $A </s>`` template."""
    vocab = [(BOS, 0.0), (PAD, 0.0), (EOS, 0.0), (UNK, 0.0)]
    vocab += [(p.piece, p.score) for p in model.pieces[3:]]
    vocab.append((MASK, 0.0))
    backend = _Backend(Unigram(vocab, unk_id=3, byte_fallback=False))

    if model.precompiled_charsmap:
        backend.normalizer = normalizers.Precompiled(model.precompiled_charsmap)
    metaspace = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), metaspace])
    backend.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} {EOS} $B {EOS}",
        special_tokens=[(BOS, 0), (EOS, 2)],
    )
    # As in transformers: control pieces become special tokens and user-defined pieces plain
    # added tokens (both matched before segmentation, keeping their vocab ids); unused, byte and
    # unknown piece types stay ordinary vocabulary entries.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, PAD, EOS, UNK)])
    added = [
        AddedToken(p.piece, special=p.type == _CONTROL, normalized=False)
        for p in model.pieces[3:]
        if p.type in (_CONTROL, _USER_DEFINED)
    ]
    backend.add_tokens(added)
    backend.add_special_tokens([AddedToken(MASK, lstrip=True, special=True, normalized=False)])
    return backend


def sentencepiece_to_tokenizer_json(spm_path: str | Path) -> str:
    """The ``tokenizer.json`` text of an XLM-R ``sentencepiece.bpe.model`` (Unigram), fairseq ids."""
    return _build_backend(_read_spm(Path(spm_path))).to_str()


def convert_sentencepiece(spm_path: str | Path, out_path: str | Path) -> Path:
    """Convert ``spm_path`` and write the result to ``out_path`` (a ``tokenizer.json``)."""
    out_path = Path(out_path)
    text = sentencepiece_to_tokenizer_json(spm_path)
    try:
        out_path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise TokenizerError(f"cannot write {out_path}: {_first_line(exc)}") from exc
    return out_path
