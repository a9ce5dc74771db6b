"""Tokenize a few texts without building the tokenizer's whole Unigram model.

``tokenizers`` takes about half a second to build XLM-R's 250,002-piece Unigram model (its trie),
the largest step of a cold ``altsearch search`` after importing torch; a query uses a few dozen of
those pieces. A :class:`PieceTable` holds every piece, score and id in flat arrays, kept in one
cache file per tokenizer file (read in milliseconds), and for a batch of texts builds a Unigram
model of only the pieces that occur in them.

Why the ids are the whole model's: Unigram segments each pre-token (a word of the normalised
text) by the best-scoring path through the pieces that match its substrings, and gives a
character that no piece covers the lowest score of the vocabulary minus 10. The small model holds
every piece equal to a substring of a pre-token of the texts, the lowest-scoring piece, and the
special tokens, so each pre-token meets the same pieces in the same order, with the same scores,
and ends on the same path. Pre-tokens are found with the tokenizer's own normaliser and
pre-tokenizer, per segment between special tokens, as ``tokenizers`` does (with both trimmings of
each segment, for tokens that strip the whitespace beside them). Unsupported layouts (another model
type, byte fallback, added tokens outside the vocabulary or matched after normalisation) keep the
whole model. ``tests/model/test_pieces.py`` compares the two on over 2,000 texts, most of them with
the real XLM-R tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend
from tokenizers.models import Unigram

log = logging.getLogger(__name__)

MAGIC = b"ALTSPIECES\x00\x01"  # the cache file's first bytes; the last two are its format version
_HEADER = struct.Struct("<Q")  # the header's length in bytes, after MAGIC
# What an added token's lstrip / rstrip removes: Unicode's White_Space (Rust's char::is_whitespace),
# which, unlike Python's str.isspace, leaves the separators U+001C-U+001F.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


class Unsupported(ValueError):
    """A tokenizer whose ids a partial model could not be trusted to reproduce."""


class PieceTable:
    """A Unigram tokenizer's pieces as arrays, and the pipeline around its model (the "shell")."""

    def __init__(self, *, blob: bytes, offsets: np.ndarray, scores: np.ndarray, hashes: np.ndarray,
                 order: np.ndarray, meta: dict):
        self._blob = blob
        self._offsets = offsets  # int64 (n + 1): piece i is blob[offsets[i]:offsets[i + 1]], UTF-8
        self._scores = scores  # float64 (n)
        self._hashes = hashes  # uint32 (n), CRC-32 of each piece's bytes, sorted
        self._order = order  # int32 (n): the piece ids in the order of ``hashes``
        self.meta = meta
        self.vocab_size: int = meta["vocab_size"]
        self.pad_id: int | None = meta["pad_id"]
        self._reserved: list[int] = meta["reserved"]  # ascending; the first ids of every partial model
        self._longest: int = meta["longest"]  # characters of the longest piece
        self._added: list[dict] = meta["added"]
        self._unk_position: int | None = meta["unk_position"]
        self.shell = _Backend.from_str(meta["shell"])  # normaliser, pre-tokenizer, post-processor
        self._splitter = _splitter([t["content"] for t in self._added])
        self._trims = any(t["lstrip"] or t["rstrip"] for t in self._added)

    def position(self, piece_id: int) -> int:
        """Where a reserved piece (an added token, <unk>, <pad>) sits in every partial model."""
        return self._reserved.index(piece_id)

    # -- building --------------------------------------------------------------------------

    @classmethod
    def from_document(cls, doc: dict) -> PieceTable:
        """The table of a parsed ``tokenizer.json``; :class:`Unsupported` when it cannot serve it."""
        model = doc.get("model") or {}
        if model.get("type") != "Unigram":
            raise Unsupported(f"model type {model.get('type')!r}, not Unigram")
        if model.get("byte_fallback"):
            raise Unsupported("byte fallback")
        vocab = model["vocab"]
        pieces = [p for p, _ in vocab]
        scores = np.array([float(s) for _, s in vocab], dtype=np.float64)
        if not pieces or not all(isinstance(p, str) and p for p in pieces):
            raise Unsupported("an empty vocabulary, or a piece that is not a string")
        if len(set(pieces)) != len(pieces):
            raise Unsupported("a piece listed twice")
        added = []
        for token in doc.get("added_tokens") or []:
            if token.get("normalized") or token.get("single_word"):
                raise Unsupported(f"added token {token['content']!r} is normalised or single-word")
            if not 0 <= token["id"] < len(pieces) or pieces[token["id"]] != token["content"]:
                raise Unsupported(f"added token {token['content']!r} is not piece {token['id']}")
            added.append({k: token.get(k, False) for k in ("content", "special", "lstrip", "rstrip")} | {"id": token["id"]})
        unk = model.get("unk_id")
        pad = next((t["id"] for t in added if t["content"] == "<pad>"), None)
        if pad is None and "<pad>" in pieces:  # as token_to_id finds it: added tokens first
            pad = pieces.index("<pad>")
        if unk is not None and not 0 <= unk < len(pieces):
            raise Unsupported(f"unk_id {unk} outside the vocabulary")
        # Always in the partial model: the added tokens, the lowest score (the unknown piece's score
        # is derived from it), <unk> and <pad>.
        reserved = sorted({t["id"] for t in added} | {int(np.argmin(scores))}
                          | {i for i in (unk, pad) if i is not None})
        position = {i: n for n, i in enumerate(reserved)}
        unk_position = position.get(unk)
        specials = _template_ids(doc.get("post_processor"))
        if any(position.get(i) != i for i in specials):
            raise Unsupported("the post-processor's special ids are not the first pieces")

        shell = dict(doc)
        shell["model"] = {**model, "vocab": [[pieces[i], float(scores[i])] for i in reserved],
                          "unk_id": unk_position}
        shell["added_tokens"] = [{**t, "id": position[t["id"]]} for t in doc.get("added_tokens") or []]
        shell["truncation"] = shell["padding"] = None
        encoded = [p.encode("utf-8") for p in pieces]
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        crc = np.fromiter((zlib.crc32(b) for b in encoded), dtype=np.uint32, count=len(encoded))
        order = np.argsort(crc, kind="stable").astype(np.int32)
        meta = {"vocab_size": len(pieces), "pad_id": pad, "reserved": reserved,
                "longest": max(len(p) for p in pieces), "added": added,
                "unk_position": unk_position, "shell": json.dumps(shell)}
        return cls(blob=b"".join(encoded), offsets=offsets, scores=scores, hashes=crc[order], order=order, meta=meta)

    # -- the partial model -----------------------------------------------------------------

    def backend(self, texts: Sequence[str]) -> tuple[_Backend, np.ndarray]:
        """A ``tokenizers.Tokenizer`` that encodes ``texts`` with this tokenizer's pipeline and the
        pieces they contain, and the table from its ids to the whole model's ids."""
        found = [i for i in self._find(self._pretokens(texts)) if i not in self._reserved]  # (np.setdiff1d imports numpy.ma)
        table = np.array(self._reserved + found, dtype=np.int64)
        vocab = [(self._piece(i), float(self._scores[i])) for i in table.tolist()]
        backend = _Backend(Unigram(vocab, self._unk_position, False))
        shell = self.shell
        if shell.normalizer is not None:
            backend.normalizer = shell.normalizer
        if shell.pre_tokenizer is not None:
            backend.pre_tokenizer = shell.pre_tokenizer
        if shell.post_processor is not None:
            backend.post_processor = shell.post_processor
        for t in self._added:
            token = AddedToken(t["content"], special=t["special"], lstrip=t["lstrip"], rstrip=t["rstrip"],
                               normalized=False, single_word=False)
            (backend.add_special_tokens if t["special"] else backend.add_tokens)([token])
        return backend, table

    def _pretokens(self, texts: Iterable[str]) -> set[str]:
        """Every pre-token the model of the whole tokenizer would be given for ``texts`` (and a few
        more: each segment beside a special token is taken trimmed and untrimmed)."""
        normalize = self.shell.normalizer.normalize_str if self.shell.normalizer is not None else None
        pretokenize = self.shell.pre_tokenizer.pre_tokenize_str if self.shell.pre_tokenizer is not None else None
        out: set[str] = set()
        for text in texts:
            for segment in self._segments(text):
                normal = normalize(segment) if normalize else segment
                if pretokenize is None:
                    out.add(normal)
                else:
                    out.update(piece for piece, _ in pretokenize(normal))
        out.discard("")
        return out

    def _segments(self, text: str) -> set[str]:
        if self._splitter is None or not self._splitter.search(text):
            return {text}
        out = set()
        for part in self._splitter.split(text):
            out.add(part)
            if self._trims:
                out.update((part.strip(_WHITESPACE), part.lstrip(_WHITESPACE), part.rstrip(_WHITESPACE)))
        return out

    def _find(self, pretokens: Iterable[str]) -> list[int]:
        """The ids of the pieces equal to a substring of one of ``pretokens``, ascending."""
        longest = self._longest
        subs = {p[i:j] for p in pretokens for i in range(len(p)) for j in range(i + 1, min(len(p), i + longest) + 1)}
        if not subs:
            return []
        encoded = [s.encode("utf-8") for s in subs]
        crc = np.fromiter((zlib.crc32(b) for b in encoded), dtype=np.uint32, count=len(encoded))
        lo = np.searchsorted(self._hashes, crc, "left")
        hi = np.searchsorted(self._hashes, crc, "right")
        found = []
        blob, offsets, order = self._blob, self._offsets, self._order
        for k in np.flatnonzero(hi > lo).tolist():
            for h in range(lo[k], hi[k]):
                i = int(order[h])
                if blob[offsets[i]:offsets[i + 1]] == encoded[k]:
                    found.append(i)
        return sorted(found)

    def _piece(self, i: int) -> str:
        return self._blob[self._offsets[i]:self._offsets[i + 1]].decode("utf-8")

    # -- the cache file --------------------------------------------------------------------

    def save(self, path: Path, source: dict) -> None:
        """Write the table to ``path`` (through a temporary file: readers see all of it or none)."""
        meta = {**self.meta, "source": source}
        header = json.dumps(meta).encode("utf-8")
        arrays = [self._offsets, self._scores, self._hashes, self._order]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + _HEADER.pack(len(header)) + header)
                for a in arrays:
                    f.write(a.tobytes())
                f.write(self._blob)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, source: dict) -> PieceTable | None:
        """The table saved at ``path`` for ``source``; None when absent, stale or unreadable."""
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            if not data.startswith(MAGIC):
                raise ValueError("not a piece table of this version")
            start = len(MAGIC) + _HEADER.size
            (size,) = _HEADER.unpack_from(data, len(MAGIC))
            meta = json.loads(data[start:start + size].decode("utf-8"))
            if meta.get("source") != source:
                return None
            n, pos = meta["vocab_size"], start + size
            arrays = []
            for dtype, count in ((np.int64, n + 1), (np.float64, n), (np.uint32, n), (np.int32, n)):
                arrays.append(np.frombuffer(data, dtype=dtype, count=count, offset=pos))
                pos += arrays[-1].nbytes
            offsets, scores, hashes, order = arrays
            blob = data[pos:]
            if len(blob) != int(offsets[-1]):
                raise ValueError("truncated")
            return cls(blob=blob, offsets=offsets, scores=scores, hashes=hashes, order=order, meta=meta)
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.debug("ignoring piece table %s: %s", path, exc)
            return None


def _splitter(contents: list[str]) -> re.Pattern | None:
    """Leftmost-longest matching of the added tokens' contents, as ``tokenizers`` splits on them."""
    if not contents:
        return None
    return re.compile("|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True)))


def _template_ids(post_processor: dict | None) -> list[int]:
    """The ids a post-processor inserts; :class:`Unsupported` for kinds other than a template."""
    if post_processor is None:
        return []
    if post_processor.get("type") != "TemplateProcessing":
        raise Unsupported(f"post-processor {post_processor.get('type')!r}")
    return [i for token in post_processor.get("special_tokens", {}).values() for i in token["ids"]]


# -- where tables are kept ---------------------------------------------------------------------


def source_key(path: Path) -> dict:
    """What identifies a tokenizer file's contents for the cache: its real path, inode, size, and
    modification and change times (a file replaced by another of the same size, its mtime copied over
    with ``cp -p``, still has a new change time)."""
    real = path.resolve()
    st = real.stat()
    return {"path": str(real), "inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def cache_path(path: Path) -> Path:
    from altsearch.home import cache_dir

    name = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return cache_dir() / "tokenizers" / f"{name}.pieces"
