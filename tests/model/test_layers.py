"""Linear's CPU product through oneDNN: the same numbers as F.linear, used where it can be, and
torch's own product wherever it cannot (another CPU, a kernel that is missing or wrong, autograd)."""

from __future__ import annotations

import logging
import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from altsearch import load_model
from altsearch.model import layers as L

X86 = platform.machine().lower() in {"x86_64", "amd64"} and torch.backends.mkldnn.is_available()
needs_x86 = pytest.mark.skipif(not X86, reason="oneDNN's linear kernel is used on x86-64 only")

TEXTS = ["a cat", "海边的日落", "一只猫 a dog on the beach at night", "red car"]


def _linear(n_in: int = 40, n_out: int = 24, bias: bool = True) -> L.Linear:
    torch.manual_seed(0)
    lin = L.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in))
        if bias:
            lin.bias.copy_(torch.randn(n_out))
    return lin.requires_grad_(False)


def _ops(fn) -> dict[str, int]:
    """How many times each operator ran during ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


@needs_x86
def test_float32_cpu_linear_runs_onednn_with_the_same_numbers(monkeypatch):
    x = torch.randn(3, 9, 40)[:, 1:8]  # a strided view, as attention's sliced queries
    for bias in (True, False):
        lin = _linear(bias=bias)
        with torch.inference_mode():
            lin(x)  # the kernel's check runs on first use
            ops = _ops(lambda: lin(x))
            got = lin(x)
            assert ops.get("mkldnn::_linear_pointwise") == 1 and "aten::addmm" not in ops, ops
            monkeypatch.setenv(L.ONEDNN_ENV, "0")
            ops = _ops(lambda: lin(x))
            want = lin(x)
            monkeypatch.delenv(L.ONEDNN_ENV)
        assert "mkldnn::_linear_pointwise" not in ops, ops
        assert got.shape == want.shape == (3, 7, 24)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@needs_x86
def test_model_towers_run_onednn_and_embed_as_torch_does(tiny_checkpoint, monkeypatch):
    model = load_model(tiny_checkpoint, device="cpu", towers=["text", "vision"])
    assert model.info()["linear"] == "onednn"
    n_linear = sum(isinstance(m, L.Linear) for m in model.module.text_model.modules()) + 1  # + projection
    pixels = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    model.encode_text(TEXTS[:1])
    ops = _ops(lambda: model.encode_text(TEXTS[:1]))
    assert ops.get("mkldnn::_linear_pointwise") == n_linear, ops
    text, image = model.encode_text(TEXTS), model.encode_pixels(pixels)
    monkeypatch.setenv(L.ONEDNN_ENV, "0")
    assert model.info()["linear"] == "torch"
    assert "mkldnn::_linear_pointwise" not in _ops(lambda: model.encode_text(TEXTS[:1]))
    np.testing.assert_allclose(text, model.encode_text(TEXTS), atol=2e-6)
    np.testing.assert_allclose(image, model.encode_pixels(pixels), atol=2e-6)


def test_grad_mode_keeps_torch_product_and_its_gradients():
    lin = _linear().requires_grad_(True)
    x = torch.randn(5, 40, requires_grad=True)
    ops = _ops(lambda: lin(x).sum().backward())
    assert "mkldnn::_linear_pointwise" not in ops
    torch.testing.assert_close(lin.weight.grad, x.detach().sum(0).expand(24, 40))
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(5, 40))


def test_other_dtypes_and_devices_keep_torch_product():
    lin = _linear().to(torch.bfloat16)
    with torch.inference_mode():
        ops = _ops(lambda: lin(torch.randn(4, 40, dtype=torch.bfloat16)))
    assert "mkldnn::_linear_pointwise" not in ops


def test_probe_refuses_a_wrong_missing_or_foreign_kernel(caplog):
    real = F.linear

    def wrong(x, w, b, *_):
        return real(x, w, None)  # drops the bias

    def right(x, w, b, *_):
        return real(x, w, b)

    def missing():
        raise AttributeError("no such op")

    with caplog.at_level(logging.WARNING):
        assert L.OneDNN(machine="x86_64", load=lambda: wrong).find() is None
    assert "disagrees" in caplog.text
    assert L.OneDNN(machine="x86_64", load=missing).find() is None
    assert L.OneDNN(machine="aarch64", load=lambda: right).find() is None
    found = L.OneDNN(machine="x86_64", load=lambda: right)
    if torch.backends.mkldnn.is_available():
        assert found.find() is right and found.kernel() == "onednn"


def test_a_refused_kernel_leaves_linear_on_torch(monkeypatch):
    calls = []

    def raising(*args):
        calls.append(args)
        raise RuntimeError("unsupported")

    monkeypatch.setattr(L, "onednn", L.OneDNN(machine="x86_64", load=lambda: raising))
    lin = _linear()
    x = torch.randn(2, 40)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    assert L.onednn.kernel() == "torch"
    assert len(calls) <= 1  # the check, never a forward pass


# --- packed weights --------------------------------------------------------------------------------


def _text_linears(model) -> list[L.Linear]:
    return [m for m in [*model.module.text_model.modules(), model.module.text_projection] if isinstance(m, L.Linear)]


@needs_x86
def test_pack_copies_the_text_weights_and_gives_the_same_vectors(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu")
    model.pack_calls = None
    want = model.encode_text(TEXTS)
    assert model.pack().packed_layers == {"text": len(_text_linears(model))}
    assert all(m.packed is not None and m.packed.is_mkldnn for m in _text_linears(model))
    assert all(m.packed is None for m in model.module.vision_model.modules() if isinstance(m, L.Linear))
    np.testing.assert_allclose(model.encode_text(TEXTS), want, atol=2e-6)
    assert model.info()["packed_linear_layers"] == model.packed_layers
    assert "text_pack" in model.load_seconds


@needs_x86
def test_a_process_packs_on_its_nth_text_encoding_when_memory_allows(tiny_checkpoint, monkeypatch):
    from altsearch import sysmem

    model = load_model(tiny_checkpoint, device="cpu")
    model.pack_calls = 3
    for _ in range(2):
        model.encode_text(TEXTS[:1])
    assert model.packed_layers == {}  # a one-off query never pays for the copy
    model.encode_text(TEXTS[:1])
    assert model.packed_layers == {"text": len(_text_linears(model))}

    tight = load_model(tiny_checkpoint, device="cpu")
    tight.pack_calls = 1
    need = L.linear_bytes(tight.module.text_model, tight.module.text_projection)
    monkeypatch.setattr(sysmem, "available_memory", lambda: 4 * need - 1)
    tight.encode_text(TEXTS[:1])
    assert tight.packed_layers == {}  # the copy would take over a quarter of what is left
    monkeypatch.setattr(sysmem, "available_memory", lambda: 4 * need)
    tight._text_calls = 0
    tight.encode_text(TEXTS[:1])
    assert tight.packed_layers == {"text": len(_text_linears(tight))}


def test_pack_does_nothing_where_onednn_is_not_used(tiny_checkpoint, monkeypatch):
    int8 = load_model(tiny_checkpoint, device="cpu", quantize="int8")
    assert int8.pack().packed_layers == {}
    monkeypatch.setenv(L.ONEDNN_ENV, "0")
    plain = load_model(tiny_checkpoint, device="cpu")
    assert plain.pack().packed_layers == {} and plain.linear_kernel == "torch"


@needs_x86
def test_packed_weights_that_disagree_are_dropped(monkeypatch, caplog):
    real = torch.ops.mkldnn._linear_pointwise

    def off_when_packed(x, w, b, *rest):
        y = real(x, w, b, *rest)
        return y + 1 if w.is_mkldnn else y

    monkeypatch.setattr(L, "onednn", L.OneDNN(machine="x86_64", load=lambda: off_when_packed))
    block = torch.nn.Sequential(_linear(), _linear(24, 24))
    with caplog.at_level(logging.WARNING):
        assert L.pack_linears(block) == 0
    assert "not packing" in caplog.text and "differ" in caplog.text
    assert all(m.packed is None for m in block)


@needs_x86
def test_a_weight_that_cannot_be_packed_leaves_the_query_answered(tiny_checkpoint, monkeypatch):
    model = load_model(tiny_checkpoint, device="cpu")
    model.pack_calls = 1
    real = torch.ops.mkldnn._reorder_linear_weight
    calls = []

    def fails_on_the_third(w, batch):
        calls.append(w.shape)
        if len(calls) == 3:
            raise RuntimeError("unsupported layout")
        return real(w, batch)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", fails_on_the_third)
    got = model.encode_text(TEXTS)  # the call that packs
    assert len(calls) == 3 and model.packed_layers == {}
    assert all(m.packed is None for m in _text_linears(model))  # the first two were dropped too
    monkeypatch.setenv(L.ONEDNN_ENV, "0")
    np.testing.assert_allclose(got, model.encode_text(TEXTS), atol=2e-6)
