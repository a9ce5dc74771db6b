"""Standard layers that skip random initialisation, and a Linear whose CPU product is oneDNN's.

Every parameter is assigned from a checkpoint, so initialising them is wasted work. Worse, on the
meta device the initialisers route through torch's reference implementations, whose first use
imports ``torch._dynamo``: seconds added to every cold ``altsearch search``.

On an x86-64 CPU, in float32 and without autograd, :class:`Linear` multiplies through oneDNN
(``torch.ops.mkldnn._linear_pointwise``, the kernel torch's own compiler emits for CPU linears)
instead of ``F.linear``'s BLAS call. The weights stay as loaded (memory-mapped, nothing repacked).
On AMD Zen CPUs a search query's text tower, whose products have a few rows each, ran 1.7x faster
(docs/model.md, "CPU matrix products"); a batch of images, whose products have thousands of rows,
runs as fast as before. The kernel is checked against ``F.linear`` on its first use; where it is
missing or disagrees, ``F.linear`` runs. ``ALTSEARCH_ONEDNN=0`` turns it off. :func:`pack_linears`
gives a long-lived process weights in oneDNN's own layout, faster still for few rows.
"""

from __future__ import annotations

import logging
import os
import platform
import threading

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ONEDNN_ENV = "ALTSEARCH_ONEDNN"  # "0": every Linear runs F.linear
_X86 = {"x86_64", "amd64", "x64"}


def _same_product(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether two float32 products agree to rounding (another kernel's summation order)."""
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def _check_onednn(op) -> bool:
    """Whether ``op`` computes what ``F.linear`` computes, on a strided input, with and without bias."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 40, generator=g)[:, ::3]  # (3, 4, 40), not contiguous
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    return all(_same_product(op(x, w, bias, "none", [], ""), F.linear(x, w, bias)) for bias in (b, None))


class OneDNN:
    """Finds and checks the oneDNN linear kernel once per process (thread-safe). ``machine`` and
    ``load`` (which returns the kernel) stand in for the real ones in tests."""

    def __init__(self, machine: str | None = None, load=None):
        self.machine = (machine or platform.machine()).lower()
        self._load = load or (lambda: torch.ops.mkldnn._linear_pointwise)
        self._op = None
        self._found = False
        self._lock = threading.Lock()

    def find(self):
        """The checked kernel, or None where this CPU, torch build or check rules it out."""
        if not self._found:
            with self._lock:
                if not self._found:
                    self._op = self._probe()
                    self._found = True
        return self._op

    def _probe(self):
        if self.machine not in _X86 or not torch.backends.mkldnn.is_available():
            return None
        try:
            op = self._load()
            with torch.inference_mode():
                ok = _check_onednn(op)
        except (AttributeError, RuntimeError, TypeError) as e:  # another torch may name or shape it otherwise
            log.debug("oneDNN linear unavailable: %s", e)
            return None
        if not ok:
            log.warning("oneDNN's linear kernel disagrees with torch's here; using torch's")
            return None
        return op

    def active(self):
        """The checked kernel unless ``ALTSEARCH_ONEDNN=0`` is set now, else None."""
        return None if os.environ.get(ONEDNN_ENV) == "0" else self.find()

    def kernel(self) -> str:
        """What a float32 CPU Linear runs now: ``"onednn"`` or ``"torch"``."""
        return "torch" if self.active() is None else "onednn"


onednn = OneDNN()


class Linear(nn.Linear):
    packed: torch.Tensor | None = None  # the weight in oneDNN's blocked layout (:func:`pack_linears`)

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.dtype is torch.float32 and w.dtype is torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            op = onednn.active()
            if op is not None:
                packed = self.packed
                return op(x, w if packed is None else packed, self.bias, "none", [], "")
        return F.linear(x, w, self.bias)


def _linears(modules: tuple[nn.Module, ...]) -> list[Linear]:
    return [m for module in modules for m in module.modules() if isinstance(m, Linear)]


def linear_bytes(*modules: nn.Module) -> int:
    """Bytes of the weights of the :class:`Linear` layers in ``modules``: what :func:`pack_linears` copies."""
    return sum(m.weight.numel() * m.weight.element_size() for m in _linears(modules))


def pack_linears(*modules: nn.Module) -> int:
    """Give each float32 CPU :class:`Linear` in ``modules`` a copy of its weight in oneDNN's blocked
    layout, which its products then read; returns how many were packed (0 where oneDNN is not used:
    all of them or none).

    With few rows a product is bound by reading the weight, and the blocked copy reads faster: the
    full-size text tower answers one query 1.3-1.4x faster on Zen 1 (docs/model.md). The copy costs the
    weights' size in memory (1.2 GB for the text tower) and about 12 ms per 16 MB to make, so it pays
    in a process that answers many queries, not in a one-off. Each shape's first copy is checked
    against the plain weight; a mismatch, or a weight oneDNN cannot copy, packs nothing.
    """
    if (op := onednn.active()) is None:
        return 0
    try:
        reorder = torch.ops.mkldnn._reorder_linear_weight
    except (AttributeError, RuntimeError):
        return 0
    checked: set[tuple[int, ...]] = set()
    layers = [m for m in _linears(modules) if m.packed is None
              and m.weight.device.type == "cpu" and m.weight.dtype is torch.float32]
    try:
        with torch.inference_mode():
            for m in layers:
                w = m.weight.detach()
                packed = reorder(w, None)
                if tuple(w.shape) not in checked:
                    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
                    if not _same_product(op(x, packed, m.bias, "none", [], ""), op(x, w, m.bias, "none", [], "")):
                        raise RuntimeError("its products differ from the plain weight's")
                    checked.add(tuple(w.shape))
                m.packed = packed
    except (RuntimeError, TypeError) as e:  # a query that would have packed still gets its answer, unpacked
        log.warning("not packing Linear weights for oneDNN: %s", e)
        for m in layers:
            m.packed = None
        return 0
    return len(layers)


class LayerNorm(nn.LayerNorm):
    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class Conv2d(nn.Conv2d):
    def reset_parameters(self) -> None:
        pass
