from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest

from altsearch.errors import QueryError
from altsearch.query import MAX_QUERY_CHARS, Query, Term, combine, is_image_file, parse_query

IMAGES = {"./photos/ref.jpg", "/data/a + b.png", "photos/海边 日落.webp", "ref.JPG"}


def fake_is_image(path: str) -> bool:
    return path in IMAGES


def parse(text: str) -> list[tuple[str, object, float]]:
    return [(t.kind, t.value, t.weight) for t in parse_query(text, is_image_path=fake_is_image).terms]


def T(value, weight=1.0):  # noqa: N802 - a short table helper
    return ("text", value, weight)


@pytest.mark.parametrize("query, expected", [
    # plain text, Chinese, quotes
    ("beach", [T("beach")]),
    ("海边的日落", [T("海边的日落")]),
    ('"sunset over the sea"', [T("sunset over the sea")]),
    ("“海边的日落”", [T("海边的日落")]),
    # operators need whitespace on both sides
    ("beach + sunset - people", [T("beach"), T("sunset"), T("people", -1.0)]),
    ("t-shirt", [T("t-shirt")]),
    ("海边-日落", [T("海边-日落")]),
    ("beach+sunset", [T("beach+sunset")]),
    ("cat -dog", [T("cat -dog")]),
    ("cat- dog", [T("cat- dog")]),
    ("beach   +\tsunset", [T("beach"), T("sunset")]),
    ("海边 ＋ 日落 － 人", [T("海边"), T("日落"), T("人", -1.0)]),
    ("海边\u3000+\u3000日落", [T("海边"), T("日落")]),
    ("beach + +sunset", [T("beach"), T("+sunset")]),
    # leading operator
    ("-dog + cat", [T("dog", -1.0), T("cat")]),
    ("- dog + cat", [T("dog", -1.0), T("cat")]),
    ("+beach", [T("beach")]),
    ("+ beach - sand", [T("beach"), T("sand", -1.0)]),
    ('-"hot dog" + food', [T("hot dog", -1.0), T("food")]),
    # quotes keep operators, colons and '#' literal; only a weight may follow
    ('"salt - pepper" + beach', [T("salt - pepper"), T("beach")]),
    ('"a + b" - "c - d"', [T("a + b"), T("c - d", -1.0)]),
    ('"sunset:2"', [T("sunset:2")]),
    ('"#123"', [T("#123")]),
    ('"sunset over the sea":2 + beach', [T("sunset over the sea", 2.0), T("beach")]),
    ('"route 66":2', [T("route 66", 2.0)]),
    ('5" screen', [T('5" screen')]),
    ('"  spaced   out  "', [T("spaced out")]),
    # weights
    ("sunset:2 + beach", [T("sunset", 2.0), T("beach")]),
    ("cat - dog:0.5", [T("cat"), T("dog", -0.5)]),
    ("cat:.5 + dog:1.", [T("cat", 0.5), T("dog", 1.0)]),
    ("日落：3", [T("日落", 3.0)]),
    ("beach:100", [T("beach", 100.0)]),
    # colons that are not weights stay text
    ("10:30 sunset", [T("10:30 sunset")]),
    ("sunset at 10:30", [T("sunset at 10:30")]),
    ("16:9 wallpaper", [T("16:9 wallpaper")]),
    ("ratio 16:9", [T("ratio 16:9")]),
    ("route 66:2", [T("route 66:2")]),
    ("sunset :2", [T("sunset :2")]),
    ("sunset:inf", [T("sunset:inf")]),
    ("sunset:nan", [T("sunset:nan")]),
    ("sunset:1e3", [T("sunset:1e3")]),
    ("beach:", [T("beach:")]),
    ("note: beach", [T("note: beach")]),
    # ids
    ("#123", [("id", 123, 1.0)]),
    ("#12:2 - #7", [("id", 12, 2.0), ("id", 7, -1.0)]),
    ("#abc", [T("#abc")]),
    ("# 12", [T("# 12")]),
    ("#12 beach", [T("#12 beach")]),
    ("#１２", [T("#１２")]),
    # image paths (through the injected is_image_path)
    ("./photos/ref.jpg + sunset", [("image", "./photos/ref.jpg", 1.0), T("sunset")]),
    ("./photos/ref.jpg:3 - sunset", [("image", "./photos/ref.jpg", 3.0), T("sunset", -1.0)]),
    ('"/data/a + b.png" + sea', [("image", "/data/a + b.png", 1.0), T("sea")]),
    ("photos/海边 日落.webp", [("image", "photos/海边 日落.webp", 1.0)]),
    ("ref.JPG", [("image", "ref.JPG", 1.0)]),
    ("missing.jpg", [T("missing.jpg")]),
    ('"./photos/missing.jpg"', [T("./photos/missing.jpg")]),
    # whitespace and control characters
    ("  beach   at \n night  ", [T("beach at night")]),
    ("be\x07ach\x1b + sun\x7fset\x9b", [T("beach"), T("sunset")]),
    ("beach\r\n+\r\nsunset", [T("beach"), T("sunset")]),
    ("\u200bbeach", [T("\u200bbeach")]),  # format characters (Cf) are not control characters
])
def test_parse_table(query, expected):
    assert parse(query) == expected


@pytest.mark.parametrize("query, message", [
    ("", "empty query"),
    ("   \t\n ", "empty query"),
    ("\x01\x02\x7f", "empty query"),
    ("x" * (MAX_QUERY_CHARS + 1), "too long"),
    ("beach\x00", "NUL"),
    ("beach + + sunset", "missing term"),
    ("beach - - sunset", "missing term"),
    ("beach +", "missing term"),
    ("beach + ", "missing term"),
    ("+", "missing term"),
    ("-", "missing term"),
    ("- + beach", "missing term"),
    ('""', "empty term"),
    ('"   " + beach', "empty term"),
    (":2", "empty term"),
    ("beach + :2", "empty term"),
    ("- dog", "negative"),
    ("-dog - cat:2", "negative"),
    ("beach:0", "weight 0"),
    ("beach:0.000", "weight 0"),
    ('"beach":0', "weight 0"),
    ("dog:-1", "positive"),
    ("beach:101", "too large"),
    ("beach:1" + "0" * 400, "too large"),
    ('"sunset over', "closing quote"),
    ("beach + “日落", "closing quote"),
    ('"sunset" beach', "after a closing quote"),
    ('"sunset":x', "after a closing quote"),
    ("./photos/missing.jpg", "image file not found"),
    ("~/missing.png + beach", "image file not found"),
    ("#" + "9" * 20, "id too large"),
    ("caf\udce9", "not valid Unicode"),
])
def test_parse_errors(query, message):
    with pytest.raises(QueryError, match=message) as info:
        parse_query(query, is_image_path=fake_is_image)
    assert "\n" not in str(info.value)


def test_length_limit_counts_the_query_as_typed():
    assert parse("b" * MAX_QUERY_CHARS) == [T("b" * MAX_QUERY_CHARS)]
    with pytest.raises(QueryError, match="too long"):
        parse_query(" " * MAX_QUERY_CHARS + "b", is_image_path=fake_is_image)


def test_result_types():
    query = parse_query("beach:2 - #5", is_image_path=fake_is_image)
    assert query == Query((Term("text", "beach", 2.0), Term("id", 5, -1.0)))
    assert isinstance(query.terms[1].value, int)
    assert all(isinstance(t.weight, float) for t in query.terms)


def test_default_is_image_path_uses_the_filesystem(tmp_path, monkeypatch):
    (tmp_path / "ref.jpg").write_bytes(b"not checked here")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "dir.png").mkdir()
    monkeypatch.chdir(tmp_path)
    assert parse_query("ref.jpg + sea").terms[0] == Term("image", "ref.jpg", 1.0)
    assert parse_query(f"{tmp_path}/ref.jpg").terms[0].kind == "image"
    assert parse_query("notes.txt").terms[0] == Term("text", "notes.txt", 1.0)
    assert parse_query("dir.png").terms[0].kind == "text"
    assert parse_query("other.jpg").terms[0].kind == "text"
    with pytest.raises(QueryError, match="not found"):
        parse_query("./other.jpg")
    assert is_image_file(str(tmp_path / "ref.jpg"))
    assert not is_image_file(str(tmp_path / "notes.txt"))


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "ref.png").write_bytes(b"x")
    query = parse_query("~/pics/ref.png:2 + sunset")
    assert query.terms[0] == Term("image", str(tmp_path / "pics" / "ref.png"), 2.0)


def test_is_image_path_sees_expanded_paths_only_for_candidates(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    asked = []

    def spy(path):
        asked.append(path)
        return False

    parse_query("~/a.jpg:2 + #4 + beach", is_image_path=lambda p: spy(p) or p == str(tmp_path / "a.jpg"))
    assert asked == [str(tmp_path / "a.jpg"), "beach"]  # ids are never looked up as files


# --- combine -----------------------------------------------------------------------------


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(5))
def test_combine_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    vectors = unit_rows(rng, n, 768)
    weights = list(rng.uniform(0.1, 3.0, n) * rng.choice([-1, 1], n))
    weights[0] = abs(weights[0])
    expected = sum(w * v.astype(np.float64) for w, v in zip(weights, vectors))
    expected /= np.linalg.norm(expected)
    got = combine(vectors, weights)
    assert got.dtype == np.float32 and got.shape == (768,)
    assert math.isclose(float(np.linalg.norm(got)), 1.0, abs_tol=1e-5)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_combine_single_term_is_the_term():
    v = unit_rows(np.random.default_rng(0), 1, 16)
    np.testing.assert_allclose(combine(v, [2.5]), v[0], atol=1e-6)


def test_combine_weights_are_relative():
    v = unit_rows(np.random.default_rng(1), 3, 32)
    np.testing.assert_allclose(combine(v, [1, -0.5, 2]), combine(v, [10, -5, 20]), atol=1e-6)


def test_combine_rejects_cancelling_terms():
    v = unit_rows(np.random.default_rng(2), 1, 32)
    with pytest.raises(QueryError, match="cancel"):
        combine(np.vstack([v, v]), [1.0, -1.0])
    with pytest.raises(QueryError, match="cancel"):
        combine(np.zeros((2, 8), np.float32), [1.0, 1.0])


@pytest.mark.parametrize("vectors, weights", [
    (np.zeros((0, 8), np.float32), []),
    (np.ones(8, np.float32), [1.0]),
    (np.ones((2, 8), np.float32), [1.0]),
    (np.ones((2, 0), np.float32), [1.0, 1.0]),
    (np.full((1, 8), np.nan, np.float32), [1.0]),
    (np.ones((1, 8), np.float32), [float("inf")]),
])
def test_combine_rejects_malformed_input(vectors, weights):
    with pytest.raises(ValueError):
        combine(vectors, weights)


# --- fuzz --------------------------------------------------------------------------------

FRAGMENTS = [" ", "  ", " + ", " - ", "+", "-", " ＋ ", "－", '"', "“", "”", ":", "：", "#", "0", "2",
             "0.5", ".", "10:30", "beach", "海边", "日落", "t-shirt", "\t", "\n", "\x00", "\x07", "\x7f",
             "\u3000", "\udce9", "~", "/", "./photos/ref.jpg", "ref.jpg", "\\", "é", "🌅", "\u200d", ":-1",
             ":100", ":1000", "#123", "9" * 25]


def random_query(rng: random.Random) -> str:
    if rng.random() < 0.02:
        return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(500, 900)))
    if rng.random() < 0.3:
        return "".join(chr(rng.randint(0, 0x3000)) for _ in range(rng.randint(0, 30)))
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 12)))


def check_query(query: Query) -> None:
    assert query.terms and any(t.weight > 0 for t in query.terms)
    for term in query.terms:
        assert math.isfinite(term.weight) and term.weight != 0 and abs(term.weight) <= 100
        if term.kind == "text":
            assert term.value and term.value == " ".join(term.value.split())
            assert "\x00" not in term.value and "\x07" not in term.value
            term.value.encode("utf-8")
        elif term.kind == "id":
            assert isinstance(term.value, int) and term.value >= 0
        else:
            assert term.kind == "image" and fake_is_image(term.value)


def test_fuzz_only_query_errors():
    rng = random.Random(20240601)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(4000):
        text = random_query(rng)
        try:
            query = parse_query(text, is_image_path=fake_is_image)
        except QueryError as exc:
            assert str(exc) and "\n" not in str(exc)
            outcomes["error"] += 1
        else:
            check_query(query)
            outcomes["ok"] += 1
    assert outcomes["ok"] > 500 and outcomes["error"] > 500  # the fuzz reaches both sides


def test_fuzz_default_is_image_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(7)
    for _ in range(500):
        text = random_query(rng)
        try:
            parse_query(text)
        except QueryError:
            pass
    assert os.listdir(tmp_path) == []  # parsing never creates anything
