"""Device-side helpers: normalising into the model dtype, batch size from free device memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from altsearch import load_model
from altsearch.model.config import VisionConfig
from altsearch.model.preprocess import Normalizer, PreprocessConfig
from altsearch.model import runtime
from altsearch.model.runtime import cpu_flags, suggest_batch_size, vision_activation_bytes

VIT_L14 = VisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       image_size=224, patch_size=14, num_channels=3, layer_norm_eps=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_normalising_into_half_precision_equals_casting_the_float32_result(dtype):
    norm = Normalizer(PreprocessConfig())
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    got = norm(batch, dtype=dtype)
    assert got.dtype == dtype and got.shape == (2, 3, 16, 16)
    torch.testing.assert_close(got, norm(batch).to(dtype), rtol=0, atol=0)


def test_vit_l14_activation_footprint():
    # T = 257 tokens: 6*T*1024 + 3*T*4096 + 16*T*T elements, 2 bytes each in bf16, plus pixels and index.
    elements = 6 * 257 * 1024 + 3 * 257 * 4096 + 16 * 257 * 257
    assert vision_activation_bytes(VIT_L14, torch.bfloat16) == elements * 2 + 3 * 224 * 224 * 5 == 12_340_256
    assert vision_activation_bytes(VIT_L14, torch.float32) == elements * 4 + 3 * 224 * 224 * 5


@pytest.mark.parametrize(("free", "per_image", "kwargs", "want"), [
    (60 * 2**30, 12_340_256, {}, 512),  # an idle 80 GB GPU: capped
    (2 * 2**30, 12_340_256, {}, 80),  # 1 GiB usable / 11.8 MiB = 87 -> multiple of 8
    (2 * 2**30, 12_340_256, {"headroom": 1.0}, 168),  # 174 -> 168
    (70 * 2**20, 12_340_256, {}, 2),  # fewer than 8 fit: no rounding
    (1 * 2**20, 12_340_256, {}, 1),  # nothing fits: still one image at a time
    (60 * 2**30, 12_340_256, {"maximum": 100}, 96),
])
def test_suggest_batch_size(free, per_image, kwargs, want):
    assert suggest_batch_size(free, per_image, **kwargs) == want


@pytest.mark.parametrize("kwargs", [{"free_bytes": -1, "per_image_bytes": 1},
                                    {"free_bytes": 1, "per_image_bytes": 0},
                                    {"free_bytes": 1, "per_image_bytes": 1, "headroom": 0}])
def test_suggest_batch_size_refuses_nonsense(kwargs):
    with pytest.raises(ValueError):
        suggest_batch_size(**kwargs)


def test_cpu_model_suggests_its_cpu_batch(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu")
    assert model.suggest_batch_size() == 16 and model.suggest_batch_size(cpu_batch=4) == 4
    assert model.loaded_towers == ()  # nothing to measure on CPU, nothing loaded


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma avx512_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "fma", "avx512_bf16", "amx_tile"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize(("flags", "want"), [({"avx2", "fma"}, torch.float32),
                                             ({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                             ({"amx_bf16", "amx_tile"}, torch.bfloat16)])
def test_auto_dtype_on_cpu_is_bf16_only_with_native_bf16(monkeypatch, flags, want):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    assert runtime.pick_dtype("auto", torch.device("cpu")) is want
    assert runtime.pick_dtype("fp32", torch.device("cpu")) is torch.float32  # an explicit dtype is kept


def test_quantize_with_auto_dtype_runs_fp32_even_on_a_native_bf16_cpu(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert load_model(tiny_checkpoint, device="cpu").dtype is torch.bfloat16
    assert load_model(tiny_checkpoint, device="cpu", quantize="int8").dtype is torch.float32
