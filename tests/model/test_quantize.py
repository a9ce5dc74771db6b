"""The opt-in int8 path: every tower Linear quantised, vectors close to float32, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from altsearch import load_model
from altsearch.errors import ModelError
from altsearch.model.quantize import Int8Linear

TEXTS = ["a cat", "sunset over the sea beach people", "海边的日落", "一只猫 a dog on the beach at night",
         "red car in the snow", "城市夜晚"]


def _pixels(n: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)  # rows are unit vectors


def test_int8_embeddings_stay_close_to_fp32(tiny_checkpoint):
    fp32 = load_model(tiny_checkpoint, device="cpu")
    int8 = load_model(tiny_checkpoint, device="cpu", quantize="int8")
    for encode in (lambda m: m.encode_pixels(_pixels()), lambda m: m.encode_text(TEXTS)):
        want, got = encode(fp32), encode(int8)
        cos = _cosines(want, got)
        assert cos.min() >= 0.99, cos  # a wrong scale or a dropped bias lands far below
        assert not np.array_equal(want, got)  # really a different computation
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_int8_linear_is_close_to_the_float_product():
    torch.manual_seed(0)
    lin = nn.Linear(256, 48)
    lin.weight.data[3] *= 50  # one loud output channel must not drown the others (per-channel scales)
    x = torch.randn(5, 7, 256)
    with torch.inference_mode():
        want, got = lin(x), Int8Linear(lin)(x)
    assert got.shape == want.shape == (5, 7, 48)
    quiet = [c for c in range(48) if c != 3]
    for cols in (slice(None), quiet):  # one scale for the whole matrix would give 0.2 on the quiet ones
        rel = (got[..., cols] - want[..., cols]).norm() / want[..., cols].norm()
        assert rel < 0.03, rel


def test_every_tower_linear_is_quantised_and_info_says_so(tiny_checkpoint):
    fp32 = load_model(tiny_checkpoint, device="cpu", towers=["text", "vision"])
    model = load_model(tiny_checkpoint, device="cpu", quantize="int8", towers=["text", "vision"])
    for tower in ("text_model", "vision_model"):
        n_float = sum(isinstance(m, nn.Linear) for m in getattr(fp32.module, tower).modules())
        mods = list(getattr(model.module, tower).modules())
        assert not any(isinstance(m, nn.Linear) for m in mods), tower
        assert sum(isinstance(m, Int8Linear) for m in mods) == n_float > 0
    assert type(model.module.visual_projection) is not Int8Linear  # projections stay float32
    assert model.module.text_projection.weight.dtype == torch.float32
    info = model.info()
    assert info["quantize"]["mode"] == "int8" and info["quantize"]["engine"]
    assert info["quantize"]["quantized_linear_layers"] == {"text": 2 * 6 + 1, "vision": 2 * 6}
    assert info["parameters"] == fp32.info()["parameters"]  # counts the architecture, not the int8 copies
    assert fp32.info()["quantize"] is None
    assert "quantize='int8'" in repr(model)


def test_lazy_towers_quantise_as_they_load(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu", quantize="int8")
    model.encode_text(["a cat"])
    assert model.loaded_towers == ("text",) and set(model.quantized_layers) == {"text"}
    model.encode_pixels(_pixels(1))  # loading a second tower after the first was quantised
    assert set(model.quantized_layers) == {"text", "vision"}


def test_quantize_on_a_gpu_is_refused(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as asking goes
    with pytest.raises(ModelError, match="CPU only"):
        load_model(tiny_checkpoint, device="cuda", dtype="fp16", quantize="int8")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"quantize": "int4"}, "unknown quantize mode 'int4'"),
    ({"quantize": "int8", "dtype": "bf16"}, "needs dtype fp32"),
])
def test_bad_quantize_arguments_are_refused(tiny_checkpoint, kwargs, message):
    with pytest.raises(ModelError, match=message):
        load_model(tiny_checkpoint, device="cpu", **kwargs)
