"""altsearch.model.tokenizer against transformers (5.x) and sentencepiece.

The real XLM-R tokenizer.json lives in ../shared beside the repository; tests that need it skip
when it is absent. The sentencepiece tests train a tiny Unigram model on a generated corpus.
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import pytest
import tokenizers
import torch

from altsearch.errors import TokenizerError
from altsearch.model.tokenizer import (
    DEFAULT_MAX_LENGTH,
    Tokenizer,
    convert_sentencepiece,
    sentencepiece_to_tokenizer_json,
)
from tests.checkpoints import tiny_tokenizer_json

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
REAL_JSON = SHARED / "data" / "xlm-roberta" / "tokenizer.json"

EN = "the a cat dog sunset over sea beach mountain city night snow photo of on in with people sky".split()
ZH = "海边的日落一只猫在沙发上睡觉狗山城市夜晚雪树花车人红绿蓝色照片天空水"
OTHER = ["Привет", "мир", "こんにちは", "세계", "café", "naïve", "١٢٣", "ελληνικά"]
EMOJI = ["😀", "🐱", "🌅", "👍🏽", "🇨🇳"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u3000", "\u00a0", "\u2003"]
ODD = ["\u200b", "\u0085", "\u2028", "\ufeff", "ﬁ", "①", "Ａ", "ｂ", "<", ">", "/", ".", ",", "!", "?"]
SPECIALS = ["<s>", "</s>", "<pad>", "<unk>", "<mask>"]


def fuzz_texts(seed: int, n: int, alphabet: list[str], max_parts: int = 25) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_parts))) for _ in range(n)]


def plain_text(rng: random.Random) -> str:
    words = [rng.choice(EN) if rng.random() < 0.5 else "".join(rng.sample(ZH, rng.randint(1, 4)))
             for _ in range(rng.randint(1, 8))]
    return " ".join(words)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# --- the real XLM-R tokenizer.json -------------------------------------------------------------


@pytest.fixture(scope="module")
def real_path() -> Path:
    if not REAL_JSON.is_file():
        pytest.skip(f"{REAL_JSON} is absent")
    return REAL_JSON


@pytest.fixture(scope="module")
def real(real_path) -> Tokenizer:
    return Tokenizer.from_file(real_path)


@pytest.fixture(scope="module")
def hf_v5(real_path, tmp_path_factory):
    """What transformers 5 loads for AltCLIP: XLMRobertaTokenizer.from_pretrained(folder)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("xlmr")
    (folder / "tokenizer.json").symlink_to(real_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return transformers.XLMRobertaTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def hf_as_is(real_path):
    """XLMRobertaTokenizerFast(tokenizer_file=...): the file's own pipeline, unchanged."""
    transformers = pytest.importorskip("transformers")
    return transformers.XLMRobertaTokenizerFast(tokenizer_file=str(real_path))


def reference(hf, texts: list[str], max_length: int = DEFAULT_MAX_LENGTH):
    out = hf(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


def assert_same(ours: Tokenizer, hf, texts: list[str]) -> None:
    ids, mask = ours.encode(texts)
    ref_ids, ref_mask = reference(hf, texts, ours.max_length)
    assert ids.dtype == mask.dtype == torch.int64
    for row, text in enumerate(texts):
        assert ids[row].tolist() == ref_ids[row].tolist(), repr(text)
    assert torch.equal(mask, ref_mask)


CASES = [
    "海边的日落", "一只猫在沙发上睡觉", "a cat sleeping on the sofa", "Sunset over the SEA, 2024!",
    "日落 sunset 海边", "海边sunset日落", "🐱🌅 cat 猫 👍🏽", "🇨🇳",
    " leading", "trailing ", "  both  ", "many     spaces   here", "tab\tseparated", "new\nline",
    "\u3000全角\u3000空格\u3000", "no\u00a0break", "<s>", "</s>", "<mask>", "a <mask> b", "x<pad>y",
    "ＦＵＬＬ ｗｉｄｔｈ", "ﬁne ①②", "Привет мир", "café naïve", "",
]


@pytest.mark.parametrize("text", CASES)
def test_real_matches_transformers(real, hf_v5, text):
    assert_same(real, hf_v5, [text])


def test_real_vocabulary_and_specials(real):
    assert (real.pad_id, real.vocab_size, real.max_length) == (1, 250_002, DEFAULT_MAX_LENGTH)
    ids, mask = real.encode(["<s>", "<mask>", "</s>"])
    assert ids.tolist() == [[0, 0, 2], [0, 250_001, 2], [0, 2, 2]]
    assert mask.tolist() == [[1, 1, 1]] * 3


@pytest.mark.parametrize("text", ["", " ", "   ", "\t\n", "\u3000", " \u00a0 "])
def test_empty_and_whitespace_only_encode_as_bos_eos(real, text):
    ids, mask = real.encode([text])
    assert ids.tolist() == [[0, 2]] and mask.tolist() == [[1, 1]]


def test_trailing_whitespace_adds_no_token(real, hf_as_is):
    """The file run as-is (transformers 4 behaviour) appends a '▁' (id 6); we follow sentencepiece."""
    ids, _ = real.encode(["sunset", "sunset ", "sunset\t\n", "  sunset"])
    assert ids[0].tolist() == ids[1].tolist() == ids[2].tolist() == ids[3].tolist()
    assert hf_as_is("sunset ")["input_ids"] == ids[0].tolist()[:-1] + [6, 2]


def test_real_matches_tokenizer_file_as_is_without_edge_whitespace(real, hf_as_is):
    rng = random.Random(3)
    texts = [t for t in CASES if t == t.strip() and "<" not in t]
    texts += [plain_text(rng) for _ in range(200)]
    assert_same(real, hf_as_is, texts)


def test_full_width_letters_are_normalised(real):
    ids, _ = real.encode(["ＦＵＬＬ width ＡＢＣ", "FULL width ABC"])
    assert ids[0].tolist() == ids[1].tolist()


@pytest.mark.parametrize("max_length", [DEFAULT_MAX_LENGTH, 16])
def test_truncation_keeps_eos(real, real_path, hf_v5, max_length):
    tok = real if max_length == real.max_length else Tokenizer.from_file(real_path, max_length=max_length)
    long_en = "a photo of a cat on the beach at sunset " * 40
    long_zh = "海边的日落" * 100
    ids, mask = tok.encode([long_en, long_zh, "short"])
    assert ids.shape == (3, max_length)
    assert ids[:2, 0].tolist() == [0, 0] and ids[:2, -1].tolist() == [2, 2]
    assert mask[:2].all() and mask[2].sum() < max_length
    full = hf_v5(long_en)["input_ids"]  # not truncated
    assert len(full) > 200 and ids[0, :-1].tolist() == full[: max_length - 1]  # a prefix, then </s>
    assert_same(tok, hf_v5, [long_en, long_zh, "short"])


def test_batch_padding_matches_transformers(real, hf_v5):
    texts = ["猫", "a photo of a dog running on the beach", "", "日落 sunset 海边 🌅", "   "]
    ids, mask = real.encode(texts)
    assert ids.shape == mask.shape == (5, int(mask.sum(1).max()))
    lengths = mask.sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
        assert (ids[row, n:] == 1).all() and ids[row, n - 1] == 2
    assert_same(real, hf_v5, texts)


def test_fuzz_matches_transformers(real, hf_v5):
    alphabet = EN + list(ZH) + OTHER + EMOJI + SPACES + ODD + SPECIALS + list("abcxyz0123 ")
    texts = fuzz_texts(seed=0, n=400, alphabet=alphabet, max_parts=40)
    assert_same(real, hf_v5, texts)


def test_encode_rejects_non_strings_and_accepts_an_empty_batch(real):
    with pytest.raises(TypeError):
        real.encode("a cat")
    with pytest.raises(TypeError):
        real.encode([("a cat", "a dog")])  # tokenizers would silently encode a pair
    ids, mask = real.encode([])
    assert ids.shape == mask.shape == (0, 0) and ids.dtype == torch.int64


# --- the tiny test tokenizer ---------------------------------------------------------------------


def test_tiny_tokenizer_loads_and_pads_with_one(tmp_path):
    (tmp_path / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    tok = Tokenizer.from_dir(tmp_path)
    ids, mask = tok.encode(["sunset over the sea", "猫", "海边的日落 red car"])
    assert tok.pad_id == 1
    assert ids[:, 0].tolist() == [0, 0, 0]
    n = int(mask[1].sum())
    assert n < ids.shape[1] and ids[1, n - 1] == 2 and (ids[1, n:] == 1).all() and not mask[1, n:].any()
    assert 3 not in ids.tolist()[0]  # every word is in the tiny vocabulary
    assert tok.vocab_size == len(json.loads(tiny_tokenizer_json())["model"]["vocab"])


# --- sentencepiece .model conversion -------------------------------------------------------------


def generated_corpus(n: int = 3000) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 12)):
            r = rng.random()
            if r < 0.45:
                parts.append(rng.choice(EN))
            elif r < 0.8:
                parts.append("".join(rng.choice(ZH) for _ in range(rng.randint(1, 4))))
            elif r < 0.9:
                parts.append(rng.choice(OTHER))
            else:
                parts.append(str(rng.randint(0, 9999)))
        lines.append(" ".join(parts) + rng.choice([".", "!", "?", ",", ""]))
    return lines


def train_spm(path: Path, model_type: str = "unigram") -> Path:
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(generated_corpus()), model_writer=buf, model_type=model_type,
        vocab_size=400, character_coverage=1.0, user_defined_symbols=["<city>"],
        control_symbols=["<ctl>"], minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "sentencepiece.bpe.model").write_bytes(buf.getvalue())
    return path / "sentencepiece.bpe.model"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def converted(spm_model) -> Tokenizer:
    return Tokenizer.from_dir(spm_model.parent)  # only the .model is there


SPM_ALPHABET = EN + list(ZH) + OTHER + EMOJI + SPACES + ["\u200b", "ﬁ", "①", "Ａ", "!", ".", "é"]


def test_converted_vocabulary_follows_the_fairseq_layout(spm_model):
    pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")  # needs protobuf
    proto = pb2.ModelProto()
    proto.ParseFromString(spm_model.read_bytes())
    doc = json.loads(sentencepiece_to_tokenizer_json(spm_model))
    expected = [["<s>", 0.0], ["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0]]
    expected += [[p.piece, p.score] for p in proto.pieces[3:]] + [["<mask>", 0.0]]
    assert doc["model"]["vocab"] == expected and doc["model"]["unk_id"] == 3
    charsmap = base64.b64decode(doc["normalizer"]["precompiled_charsmap"])
    assert charsmap == proto.normalizer_spec.precompiled_charsmap


def test_converted_matches_transformers_from_spm(spm_model, converted):
    pytest.importorskip("google.protobuf")
    transformers = pytest.importorskip("transformers")
    hf = transformers.XLMRobertaTokenizer.from_pretrained(str(spm_model.parent))
    alphabet = SPM_ALPHABET + ["\u0085", "\u2028", "<city>", "<ctl>"] + SPECIALS
    texts = fuzz_texts(seed=1, n=400, alphabet=alphabet)
    assert_same(converted, hf, texts)


def test_converted_matches_sentencepiece_with_fairseq_offset(spm_model, converted):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    texts = fuzz_texts(seed=2, n=400, alphabet=SPM_ALPHABET)
    ids, mask = converted.encode(texts)
    for row, text in enumerate(texts):
        expected = [0] + [i + 1 if i else 3 for i in sp.encode(text)] + [2]
        n = int(mask[row].sum())
        assert ids[row, :n].tolist() == expected, repr(text)


def test_converted_special_pieces(spm_model, converted):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    city, ctl = sp.piece_to_id("<city>") + 1, sp.piece_to_id("<ctl>") + 1
    ids, _ = converted.encode(["sea<city>sky", "<ctl>", "<mask>", "<unk>"])
    assert city in ids[0].tolist()
    assert ids[1, :3].tolist() == [0, ctl, 2]
    assert ids[2, :3].tolist() == [0, converted.vocab_size - 1, 2]
    assert ids[3, :3].tolist() == [0, 3, 2]
    assert converted.vocab_size == sp.get_piece_size() + 2


def test_convert_sentencepiece_writes_a_readable_tokenizer_json(spm_model, converted, tmp_path):
    out = convert_sentencepiece(spm_model, tmp_path / "tokenizer.json")
    assert out == tmp_path / "tokenizer.json"
    texts = fuzz_texts(seed=4, n=200, alphabet=SPM_ALPHABET + SPECIALS)
    a, b = Tokenizer.from_file(out).encode(texts), converted.encode(texts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    plain = tokenizers.Tokenizer.from_file(str(out))  # the file alone gives the same ids
    for row, encoding in enumerate(plain.encode_batch(texts)):
        assert encoding.ids == b[0][row, : len(encoding.ids)].tolist(), repr(texts[row])


def test_full_size_xlmr_model_converts_to_the_real_ids(real_path, real, tmp_path):
    """Rebuild XLM-R's 250k-piece .model from the real tokenizer.json (with protobuf), convert it back."""
    pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    doc = json.loads(real_path.read_text(encoding="utf-8"))
    proto = pb2.ModelProto()
    for piece, kind in (("<unk>", 2), ("<s>", 3), ("</s>", 3)):
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    for piece, score in doc["model"]["vocab"][4:-1]:  # fairseq id i + 1 -> spm id i
        proto.pieces.add(piece=piece, score=score)
    proto.trainer_spec.model_type = 1
    proto.normalizer_spec.name = "nmt_nfkc"
    charsmap = doc["normalizer"]["normalizers"][0]["precompiled_charsmap"]
    proto.normalizer_spec.precompiled_charsmap = base64.b64decode(charsmap)
    (tmp_path / "sentencepiece.bpe.model").write_bytes(proto.SerializeToString())

    converted = Tokenizer.from_dir(tmp_path)
    assert converted.vocab_size == real.vocab_size == 250_002
    alphabet = EN + list(ZH) + OTHER + EMOJI + SPACES + ODD + SPECIALS
    texts = fuzz_texts(seed=5, n=300, alphabet=alphabet, max_parts=40) + CASES
    a, b = converted.encode(texts), real.encode(texts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_from_dir_prefers_tokenizer_json(spm_model, tmp_path):
    (tmp_path / "sentencepiece.bpe.model").write_bytes(spm_model.read_bytes())
    (tmp_path / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).vocab_size == len(json.loads(tiny_tokenizer_json())["model"]["vocab"])


def test_a_bpe_sentencepiece_model_is_refused(tmp_path):
    path = train_spm(tmp_path, model_type="bpe")
    with pytest.raises(TokenizerError, match="not a Unigram"):
        Tokenizer.from_dir(tmp_path)
    assert path.is_file()


# --- errors ----------------------------------------------------------------------------------------


def test_folder_without_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "sentencepiece.bpe.model" in message


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.from_file(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "content", [b"not json at all", b"{}", b'{"model": {"type": "Unigram"}}', b"\xff\xfe\x00garbage"]
)
def test_garbled_tokenizer_json(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_without_pad_token_is_refused():
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    backend = Backend(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    with pytest.raises(TokenizerError, match="<pad>"):
        Tokenizer.from_str(backend.to_str())


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00\x01\x02 random bytes \xff\xff\xff\xff", b'{"json": "not a model"}', bytes(range(256)) * 4],
)
def test_garbled_sentencepiece_model(tmp_path, content):
    path = tmp_path / "sentencepiece.bpe.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
