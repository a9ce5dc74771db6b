"""The piece table (altsearch.model.pieces): a tokenizer that encodes a few texts without building its
whole Unigram model gives the whole model's ids, and its cache file is never trusted when stale.

The real XLM-R tokenizer.json lives in ../shared beside the repository; tests that need it skip
when it is absent.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from altsearch.model import pieces as P
from altsearch.model import tokenizer as T
from altsearch.model.tokenizer import Tokenizer
from tests.checkpoints import tiny_tokenizer_json
from tests.model.test_tokenizer import (
    CASES,
    EMOJI,
    EN,
    ODD,
    OTHER,
    REAL_JSON,
    SPACES,
    SPECIALS,
    ZH,
    fuzz_texts,
    train_spm,
)

# Characters that change how text around them is normalised or split: combining marks, joiners,
# variation selectors, controls, odd whitespace, and pieces of special tokens.
TRICKY = ["\u0300", "\u0301", "\u0308", "\u200d", "\ufe0f", "\U0001f3fd", "\u0e31", "\u094d", "\u3099",
          "\x1c", "\x1f", "\x00", "\x7f", "\u180e", "\u2028", "<mask", "mask>", "</", "<", ">"]


@pytest.fixture(autouse=True)
def _no_switch(monkeypatch):
    """Every call answered from the table unless a test says otherwise."""
    monkeypatch.setattr(T, "PIECES_CALLS", 10**9)


def random_texts(seed: int, n: int, vocab: list[str]) -> list[str]:
    """Texts of whole pieces (their ▁ as spaces) mixed with characters from all of Unicode."""
    rng = random.Random(seed)
    alphabet = EN + list(ZH) + OTHER + EMOJI + SPACES + ODD + SPECIALS + TRICKY

    def char() -> str:
        if rng.random() < 0.5:
            return rng.choice(alphabet)
        c = rng.randint(0, 0x2FFFF)
        return chr(c) if not 0xD800 <= c <= 0xDFFF else "?"

    return ["".join(rng.choice(vocab).replace("\u2581", " ") if rng.random() < 0.4 else char()
                    for _ in range(rng.randint(0, 30))) for _ in range(n)]


def assert_same_ids(lazy: Tokenizer, whole: Tokenizer, texts: list[str]) -> None:
    for text in texts:  # one by one: each text gets a partial model of its own pieces
        a, b = lazy.encode([text]), whole.encode([text])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), repr(text)
    batch, size = [], 0
    for text in texts:  # and in one padded batch, as long as the table answers it
        if size + len(text) > T.PIECES_MAX_CHARS:
            break
        batch.append(text)
        size += len(text)
    a, b = lazy.encode(batch), whole.encode(batch)
    assert len(batch) > 20 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not lazy.whole_model


def folder_with(tmp_path: Path, doc_or_text, name: str = "tok") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    text = doc_or_text if isinstance(doc_or_text, str) else json.dumps(doc_or_text)
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    return folder


def cache_files() -> list[Path]:
    from altsearch.home import cache_dir

    return sorted((cache_dir() / "tokenizers").glob("*.pieces"))


# --- the same ids as the whole model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_doc() -> dict:
    if not REAL_JSON.is_file():
        pytest.skip(f"{REAL_JSON} is absent")
    return json.loads(REAL_JSON.read_text(encoding="utf-8"))


def test_real_tokenizer_from_the_table_gives_the_whole_models_ids(real_doc, tmp_path):
    folder = folder_with(tmp_path, real_doc)
    lazy, whole = Tokenizer.from_dir(folder), Tokenizer.from_file(folder / "tokenizer.json")
    assert lazy.vocab_size == whole.vocab_size == 250_002 and lazy.pad_id == whole.pad_id == 1
    vocab = [p for p, _ in real_doc["model"]["vocab"]]
    texts = CASES + fuzz_texts(seed=1, n=300, alphabet=EN + list(ZH) + OTHER + EMOJI + SPACES + ODD + SPECIALS,
                               max_parts=40) + random_texts(seed=2, n=900, vocab=vocab)
    texts.append(" ".join(["日落 sunset"] * 60))  # truncated to 77 tokens, </s> kept
    assert_same_ids(lazy, whole, texts)


def test_special_tokens_that_strip_whitespace_beside_them(real_doc, tmp_path):
    """As the sentencepiece conversion makes <mask> (lstrip); </s> made rstrip as well."""
    doc = json.loads(json.dumps(real_doc))
    for token in doc["added_tokens"]:
        token["lstrip"] = token["content"] == "<mask>"
        token["rstrip"] = token["content"] == "</s>"
    folder = folder_with(tmp_path, doc)
    lazy, whole = Tokenizer.from_dir(folder), Tokenizer.from_file(folder / "tokenizer.json")
    rng = random.Random(3)
    # "\u3000\u0301" normalises to " ": untrimmed it is a space, trimmed a combining mark
    edges = [" ", "  ", "\t", "\u3000", "\u0301", " \u0301", "\u0301 ", "\u3000\u0301b", "b\u3000\u0301", "a", "日"]
    texts = [rng.choice(edges) + rng.choice(SPECIALS) + rng.choice(edges) + rng.choice(SPECIALS) + rng.choice(edges)
             for _ in range(200)]
    texts += random_texts(seed=4, n=300, vocab=[p for p, _ in doc["model"]["vocab"]])
    assert_same_ids(lazy, whole, texts)


def test_converted_sentencepiece_model_from_the_table(tmp_path):
    """A .model (user-defined and control symbols, <mask> lstrip) is converted once, then tabled."""
    spm = train_spm(tmp_path / "spm")
    first = Tokenizer.from_dir(spm.parent)
    assert first.whole_model and len(cache_files()) == 1  # converting built the whole model anyway
    lazy = Tokenizer.from_dir(spm.parent)
    assert not lazy.whole_model
    texts = CASES + ["<city> in <ctl>", "a<city>b", "<city><city> <mask>"] + fuzz_texts(
        seed=5, n=300, alphabet=EN + list(ZH) + OTHER + SPACES + SPECIALS + ["<city>", "<ctl>", "\u0301"])
    assert_same_ids(lazy, first, texts)


def test_tiny_tokenizer_from_the_table(tmp_path):
    folder = folder_with(tmp_path, tiny_tokenizer_json())
    lazy, whole = Tokenizer.from_dir(folder), Tokenizer.from_file(folder / "tokenizer.json")
    vocab = [p for p, _ in json.loads(tiny_tokenizer_json())["model"]["vocab"]]
    assert_same_ids(lazy, whole, CASES + random_texts(seed=6, n=300, vocab=vocab))


def test_a_partial_model_holds_exactly_the_pieces_in_the_text():
    doc = json.loads(tiny_tokenizer_json())
    table = P.PieceTable.from_document(doc)
    vocab = [p for p, _ in doc["model"]["vocab"]]
    backend, ids = table.backend(["sunset 海边"])
    found = {vocab[i] for i in ids.tolist()}
    reserved = set(SPECIALS) | {min(doc["model"]["vocab"], key=lambda v: v[1])[0]}
    substrings = {w[i:j] for w in ("\u2581sunset", "\u2581海边") for i in range(len(w)) for j in range(i + 1, len(w) + 1)}
    assert found == reserved | (substrings & set(vocab))
    assert "\u2581sunset" in found and "海" in found and "\u2581sea" not in found
    assert backend.get_vocab_size() == len(ids)


# --- when the whole model is built ------------------------------------------------------------------


def test_whole_model_after_the_first_calls_or_for_a_long_batch(tmp_path, monkeypatch):
    folder = folder_with(tmp_path, tiny_tokenizer_json())
    Tokenizer.from_dir(folder)  # writes the table
    monkeypatch.setattr(T, "PIECES_CALLS", 2)
    tok = Tokenizer.from_dir(folder)
    expected = Tokenizer.from_file(folder / "tokenizer.json").encode(["red car"])[0]
    for _ in range(2):
        assert torch.equal(tok.encode(["red car"])[0], expected) and not tok.whole_model
    assert torch.equal(tok.encode(["red car"])[0], expected) and tok.whole_model

    long = Tokenizer.from_dir(folder)
    long.encode(["sea " * (T.PIECES_MAX_CHARS // 4 + 1)])
    assert long.whole_model
    assert Tokenizer.from_dir(folder).load().whole_model


def test_model_tokenizer_starts_from_the_table_unless_turned_off(tiny_checkpoint, monkeypatch):
    from altsearch.model import load_model

    load_model(str(tiny_checkpoint), device="cpu").tokenizer  # the first one writes the table
    model = load_model(str(tiny_checkpoint), device="cpu")
    vectors = model.encode_text(["sunset over the sea"])
    assert not model.tokenizer.whole_model
    monkeypatch.setenv(T.PIECES_ENV, "0")
    whole = load_model(str(tiny_checkpoint), device="cpu")
    assert whole.tokenizer.whole_model
    assert (whole.encode_text(["sunset over the sea"]) == vectors).all()


# --- the cache file ---------------------------------------------------------------------------------


def test_a_second_tokenizer_reads_the_table_and_not_the_tokenizer_file(tmp_path, monkeypatch):
    folder = folder_with(tmp_path, tiny_tokenizer_json())
    expected = Tokenizer.from_dir(folder).encode(["海边的日落 red car"])
    assert len(cache_files()) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer file was read")

    monkeypatch.setattr(T, "_read_text", refuse)
    tok = Tokenizer.from_dir(folder)
    got = tok.encode(["海边的日落 red car"])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and not tok.whole_model


def test_a_changed_tokenizer_file_is_not_served_from_the_old_table(tmp_path):
    doc = json.loads(tiny_tokenizer_json())
    folder = folder_with(tmp_path, doc)
    before = Tokenizer.from_dir(folder).encode(["sunset"])[0]
    for piece in doc["model"]["vocab"]:
        if piece[0] == "\u2581sunset":
            piece[0] = "\u2581sunsex"  # same length: only the contents (and mtime) change
    path = folder / "tokenizer.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = Tokenizer.from_dir(folder).encode(["sunset"])[0]
    assert not torch.equal(before, after)
    assert torch.equal(after, Tokenizer.from_file(path).encode(["sunset"])[0])


def test_a_file_replaced_by_one_of_the_same_size_and_mtime_is_not_served_from_the_old_table(tmp_path):
    """As `cp -p` of another tokenizer of the same size leaves it: only the change time tells."""
    doc = json.loads(tiny_tokenizer_json())
    folder = folder_with(tmp_path, doc)
    path = folder / "tokenizer.json"
    before = Tokenizer.from_dir(folder).encode(["sunset"])[0]
    st = path.stat()
    for piece in doc["model"]["vocab"]:
        if piece[0] == "\u2581sunset":
            piece[0] = "\u2581sunsex"
    path.write_text(json.dumps(doc), encoding="utf-8")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = Tokenizer.from_dir(folder).encode(["sunset"])[0]
    assert not torch.equal(before, after)
    assert torch.equal(after, Tokenizer.from_file(path).encode(["sunset"])[0])


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
def test_a_damaged_table_is_rebuilt(tmp_path, damage):
    folder = folder_with(tmp_path, tiny_tokenizer_json())
    expected = Tokenizer.from_dir(folder).encode(["red car 猫"])[0]
    (table,) = cache_files()
    data = table.read_bytes()
    table.write_bytes({"truncate": data[:-100], "garble": data[:20] + b"\xff" * 50 + data[70:],
                       "empty": b""}[damage])
    assert torch.equal(Tokenizer.from_dir(folder).encode(["red car 猫"])[0], expected)
    assert P.PieceTable.load(table, P.source_key(folder / "tokenizer.json")) is not None  # written again


def test_a_cache_that_cannot_be_written_still_serves_the_process(tmp_path):
    from altsearch.home import cache_dir

    cache_dir().parent.mkdir(parents=True, exist_ok=True)
    cache_dir().write_text("a file where the cache folder would be")
    folder = folder_with(tmp_path, tiny_tokenizer_json())
    tok = Tokenizer.from_dir(folder)
    assert not tok.whole_model
    assert torch.equal(tok.encode(["red car"])[0], Tokenizer.from_file(folder / "tokenizer.json").encode(["red car"])[0])


def test_two_folders_sharing_one_file_share_one_table(tmp_path):
    folder = folder_with(tmp_path, tiny_tokenizer_json())
    other = tmp_path / "link"
    other.mkdir()
    (other / "tokenizer.json").symlink_to(folder / "tokenizer.json")  # as the hub cache's snapshots do
    Tokenizer.from_dir(folder)
    Tokenizer.from_dir(other)
    assert len(cache_files()) == 1


# --- layouts the table does not serve ---------------------------------------------------------------


def unsupported_layouts() -> dict[str, dict]:
    base = json.loads(tiny_tokenizer_json())
    normalized, single, outside, fallback = (json.loads(json.dumps(base)) for _ in range(4))
    normalized["added_tokens"][-1]["normalized"] = True
    single["added_tokens"][-1]["single_word"] = True
    outside["model"]["vocab"].pop()  # <mask> added beyond the vocabulary
    outside["added_tokens"][-1]["id"] = len(outside["model"]["vocab"])
    fallback["model"]["byte_fallback"] = True
    return {"normalised added token": normalized, "single-word added token": single,
            "added token outside the vocabulary": outside, "byte fallback": fallback}


@pytest.mark.parametrize("layout", sorted(unsupported_layouts()))
def test_unsupported_layouts_build_the_whole_model(tmp_path, layout, monkeypatch):
    doc = unsupported_layouts()[layout]
    with pytest.raises(P.Unsupported):
        P.PieceTable.from_document(doc)
    folder = folder_with(tmp_path, doc)
    reads = []
    real_read = T._read_text
    monkeypatch.setattr(T, "_read_text", lambda path: reads.append(path) or real_read(path))
    tok = Tokenizer.from_dir(folder)
    assert tok.whole_model and cache_files() == []
    assert reads == [folder / "tokenizer.json"]  # read once: the whole model is parsed from the same text
    monkeypatch.undo()
    assert torch.equal(tok.encode(["red car"])[0], Tokenizer.from_file(folder / "tokenizer.json").encode(["red car"])[0])


def test_bad_input_raises_what_the_whole_model_raises(tmp_path):
    folder = folder_with(tmp_path, tiny_tokenizer_json())
    Tokenizer.from_dir(folder)
    lazy, whole = Tokenizer.from_dir(folder), Tokenizer.from_file(folder / "tokenizer.json")
    with pytest.raises(Exception) as expected:
        whole.encode(["a\ud800b"])
    with pytest.raises(type(expected.value)):
        lazy.encode(["a\ud800b"])


def test_copied_folder_keeps_working(tmp_path):
    """A table is keyed by the file's real path: a copy gets one of its own."""
    folder = folder_with(tmp_path, tiny_tokenizer_json())
    Tokenizer.from_dir(folder)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert not Tokenizer.from_dir(copy).whole_model and len(cache_files()) == 2


def test_threads_encoding_at_once_across_the_switch_get_the_whole_models_ids(tmp_path, monkeypatch):
    """A server's threads share one tokenizer: the calls from the table and the one that builds the
    whole model (on the 9th call here) may overlap; every answer stays the whole model's."""
    from concurrent.futures import ThreadPoolExecutor

    folder = folder_with(tmp_path, tiny_tokenizer_json())
    Tokenizer.from_dir(folder)  # writes the table
    monkeypatch.setattr(T, "PIECES_CALLS", 8)
    tok, whole = Tokenizer.from_dir(folder), Tokenizer.from_file(folder / "tokenizer.json")
    vocab = [p for p, _ in json.loads(tiny_tokenizer_json())["model"]["vocab"]]
    texts = random_texts(seed=7, n=64, vocab=vocab)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda t: tok.encode([t])[0], texts))
    assert tok.whole_model
    for text, ids in zip(texts, got):
        assert torch.equal(ids, whole.encode([text])[0]), repr(text)
