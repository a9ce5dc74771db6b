"""The query language: what a user types, turned into weighted terms. Pure, no side effects
(apart from the ``is_image_path`` check, which the caller may replace).

Examples: ``beach``, ``海边的日落``, ``"sunset over the sea"``, ``beach + sunset - people``,
``sunset:2 + beach``, ``cat - dog:0.5``, ``./photos/ref.jpg + sunset``, ``#123``.

Rules (each one is tested in tests/test_query.py):

* Cleaning: a query longer than ``MAX_QUERY_CHARS`` (2000) characters, as typed, is an error, and
  so is a NUL character. Every whitespace character (tabs, newlines, the ideographic space U+3000)
  counts as a space; other control characters (Unicode category Cc) are removed. What is left is
  trimmed; if nothing is left the query is an error (empty).
* Operators: terms are joined by ``+`` and ``-`` (or the full-width ``＋`` / ``－`` of Chinese input
  methods). Mid-query an operator counts only when it stands alone with whitespace on both sides,
  so ``t-shirt``, ``海边-日落``, ``beach+sunset`` and ``cat -dog`` are each ONE text term.
  The query may also start with an operator, attached or not: ``-dog + cat`` and ``- dog + cat``
  make ``dog`` negative; a leading ``+`` changes nothing.
* A missing term (``beach + + sunset``, ``beach +``, ``- + beach``) is an error; so is a query
  whose terms are all negative (there is nothing to search for).
* Quotes: a term that starts with ``"`` (or the Chinese ``“``) runs to the matching ``"`` (``”``);
  inside it ``+``, ``-``, ``:`` and ``#`` are literal text. Only a ``:weight`` may follow the
  closing quote; other text there, or a missing closing quote, is an error. A quote anywhere
  else is an ordinary character (``5" screen`` is text).
* Weights: ``term:w`` (or ``term：w``) with ``w`` a plain decimal number (``2``, ``0.5``, ``.5``;
  no exponent, no ``inf``/``nan``) attached to the term. To keep times and ratios as text
  (``10:30 sunset``, ``sunset at 10:30``, ``16:9``), a weight is only recognised when the text
  before the colon does not end in a digit -- ``#12:2`` (an id) and ``"route 66":2`` (quoted)
  still take one. A weight of 0, a negative weight (``dog:-1``; write ``- dog:1``) or one above
  ``MAX_WEIGHT`` (100) is an error. The term's weight is negated by a ``-`` operator.
* Ids: an unquoted ``#`` followed by ASCII digits is a catalogue image id (``#123``).
* Images: a term naming an existing image file (``is_image_path``, after ``~`` expansion) becomes
  an image term whose value is the ``~``-expanded path (relative paths stay relative to the
  working directory). Quoted terms may be paths too (for names with `` + `` in them). An unquoted
  term that looks like an image path (image extension and a ``/``, ``\\`` or leading ``~``) but
  names no file is an error ("image file not found"), not a silent text search.
* Text: everything else. Runs of whitespace collapse to one space. Text must be valid Unicode:
  lone surrogates (from undecodable command-line bytes) are an error.

Every error is ``QueryError`` with a one-line message.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import QueryError
from .scan import IMAGE_EXTENSIONS

MAX_QUERY_CHARS = 2000
MAX_WEIGHT = 100.0
MAX_IMAGE_ID = 2**63 - 1
# combine(): a result shorter than this fraction of sum(|w_i| * |v_i|) counts as "cancelled out".
CANCEL_TOLERANCE = 1e-6

_OPERATORS = {"+": 1.0, "＋": 1.0, "-": -1.0, "－": -1.0}
_QUOTES = {'"': '"', "“": "”"}
_OPERATOR_RE = re.compile(r" +([+\-＋－])(?= |$)")
_WEIGHT_RE = re.compile(r"[:：](?P<sign>-?)(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$")
_ID_RE = re.compile(r"#([0-9]+)")
_ELLIPSIS_AT = 40


@dataclass(frozen=True)
class Term:
    """One term: its kind, value (text, image path or image id) and weight (negative for '-')."""

    kind: Literal["text", "image", "id"]
    value: str | int
    weight: float


@dataclass(frozen=True)
class Query:
    terms: tuple[Term, ...]


@dataclass(frozen=True)
class _Piece:
    """A term as split from the query, before it is interpreted."""

    sign: float
    body: str
    quoted: bool
    weight: float


def is_image_file(path: str) -> bool:
    """The default ``is_image_path``: an existing regular file with an image extension."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(path)


def _short(text: str) -> str:
    return text if len(text) <= _ELLIPSIS_AT else text[:_ELLIPSIS_AT] + "..."


# --- cleaning and splitting --------------------------------------------------------------


def _clean(text: str) -> str:
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"query too long: {len(text)} characters (the limit is {MAX_QUERY_CHARS})")
    if "\x00" in text:
        raise QueryError("query contains a NUL character")
    kept = (" " if c.isspace() else c for c in text if c.isspace() or unicodedata.category(c) != "Cc")
    cleaned = "".join(kept).strip()
    if not cleaned:
        raise QueryError("empty query: type some words, an image path or an image #id")
    return cleaned


def _parse_weight(sign: str, number: str, term: str) -> float:
    weight = float(number)
    if sign:
        raise QueryError(f"weights must be positive: {_short(term)!r} (to subtract a term write '- term:w')")
    if weight == 0:
        raise QueryError(f"weight 0 in {_short(term)!r}: a term with weight 0 does nothing; remove it")
    if weight > MAX_WEIGHT:
        raise QueryError(f"weight too large in {_short(term)!r} (the limit is {MAX_WEIGHT:g})")
    return weight


def _split_weight(raw: str) -> tuple[str, float]:
    """Split an unquoted term into its body and weight (1.0 when it carries none)."""
    m = _WEIGHT_RE.search(raw)
    if m is None:
        return raw, 1.0
    body = raw[:m.start()]
    if not body:
        raise QueryError(f"empty term before the weight {raw!r}")
    if body[-1].isspace() or (body[-1].isdecimal() and not _ID_RE.fullmatch(body)):
        return raw, 1.0  # '10:30', 'route 66:2', 'sunset :2': text, not a weight
    return body, _parse_weight(m["sign"], m["num"], raw)


def _term_end(s: str, pos: int) -> int:
    m = _OPERATOR_RE.search(s, pos)
    return m.start() if m else len(s)


def _read_quoted(s: str, pos: int, sign: float) -> tuple[_Piece, int]:
    close = s.find(_QUOTES[s[pos]], pos + 1)
    if close < 0:
        raise QueryError(f"missing closing quote in {_short(s[pos:])!r}")
    end = _term_end(s, close + 1)
    tail = s[close + 1:end]
    weight = 1.0
    if tail:
        m = _WEIGHT_RE.fullmatch(tail)
        if m is None:
            raise QueryError(f"unexpected text after a closing quote: {_short(tail)!r}")
        weight = _parse_weight(m["sign"], m["num"], s[pos:end])
    return _Piece(sign, s[pos + 1:close], quoted=True, weight=weight), end


def _read_term(s: str, pos: int, sign: float) -> tuple[_Piece, int]:
    if pos == len(s) or (s[pos] in _OPERATORS and s[pos + 1:pos + 2] in ("", " ")):
        raise QueryError("missing term: every '+' or '-' must stand between two terms")
    if s[pos] in _QUOTES:
        return _read_quoted(s, pos, sign)
    end = _term_end(s, pos)
    body, weight = _split_weight(s[pos:end])
    return _Piece(sign, body, quoted=False, weight=weight), end


def _skip_spaces(s: str, pos: int) -> int:
    while pos < len(s) and s[pos] == " ":
        pos += 1
    return pos


def _split(s: str) -> list[_Piece]:
    """Split a cleaned query into signed pieces."""
    sign, pos = 1.0, 0
    if s[0] in _OPERATORS:
        sign, pos = _OPERATORS[s[0]], _skip_spaces(s, 1)
    pieces = []
    while True:
        piece, pos = _read_term(s, pos, sign)
        pieces.append(piece)
        if pos == len(s):
            return pieces
        m = _OPERATOR_RE.match(s, pos)
        sign, pos = _OPERATORS[m[1]], _skip_spaces(s, m.end())


# --- interpreting terms ------------------------------------------------------------------


def _looks_like_image_path(text: str) -> bool:
    has_dir = "/" in text or "\\" in text or text.startswith("~")
    return has_dir and os.path.splitext(text)[1].lower() in IMAGE_EXTENSIONS


def _text_value(body: str) -> str:
    text = " ".join(body.split())
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise QueryError(f"query text is not valid Unicode: {_short(text)!r}") from None
    return text


def _to_term(piece: _Piece, is_image_path: Callable[[str], bool]) -> Term:
    body = piece.body.strip()
    weight = piece.sign * piece.weight
    if not body:
        raise QueryError("empty term: a pair of quotes (or a weight) with nothing in it")
    if not piece.quoted and (m := _ID_RE.fullmatch(body)):
        image_id = int(m[1])
        if image_id > MAX_IMAGE_ID:
            raise QueryError(f"image id too large: {_short(body)}")
        return Term("id", image_id, weight)
    path = os.path.expanduser(body)
    if is_image_path(path):
        return Term("image", path, weight)
    if not piece.quoted and _looks_like_image_path(body):
        raise QueryError(f"image file not found: {_short(body)} (to search for this text, put it in quotes)")
    return Term("text", _text_value(body), weight)


def parse_query(text: str, *, is_image_path: Callable[[str], bool] = is_image_file) -> Query:
    """Parse what a user typed into weighted terms; raise ``QueryError`` for a query that cannot run.

    See the module docstring for the grammar.
    """
    pieces = _split(_clean(text))
    terms = tuple(_to_term(piece, is_image_path) for piece in pieces)
    if all(term.weight < 0 for term in terms):
        raise QueryError("every term is negative: add at least one term to search for (without '-')")
    return Query(terms)


# --- combining term vectors --------------------------------------------------------------


def combine(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The weighted sum of the term vectors (T, D), re-normalised to a unit (D,) float32 vector.

    Raises ``QueryError`` when the terms cancel out (a near-zero sum, e.g. ``cat - cat``), and
    ``ValueError`` for inputs that do not fit (shape mismatch, no terms, non-finite numbers).
    """
    v = np.asarray(vectors, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise ValueError(f"vectors must be a non-empty (T, D) array, got shape {v.shape}")
    if w.shape != (v.shape[0],):
        raise ValueError(f"{v.shape[0]} vectors but weights of shape {w.shape}")
    if not (np.isfinite(v).all() and np.isfinite(w).all()):
        raise ValueError("vectors and weights must be finite")
    total = w @ v
    norm = float(np.linalg.norm(total))
    scale = float(np.abs(w) @ np.linalg.norm(v, axis=1))
    if not math.isfinite(norm) or norm <= CANCEL_TOLERANCE * scale:
        raise QueryError("the query terms cancel each other out: nothing is left to search for")
    return (total / norm).astype(np.float32)
