"""Opt-in int8 dynamic quantisation of the towers' Linear layers, for CPU inference.

Each Linear weight is rounded once to int8 (symmetric, one scale per output channel); at run time
every input batch is quantised to 8 bits with its own range and multiplied by torch's quantized
GEMM (fbgemm on x86), then scaled back to float32. Embeddings, LayerNorms, attention products and
the two projections stay float32. The vectors are close to, not equal to, the float32 ones: see
``docs/model.md`` for the measured speed and drift.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import ModelError

MODES = ("int8",)


def check_mode(quantize: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a quantisation mode this device or dtype cannot run."""
    if quantize is None:
        return
    if quantize not in MODES:
        raise ModelError(f"unknown quantize mode {quantize!r} (use int8, or none)")
    if device.type != "cpu":
        raise ModelError(f"quantize={quantize!r} runs on CPU only, not on {device}; "
                         "GPUs run fp16/bf16 (dtype='auto')")
    if dtype != torch.float32:
        name = str(dtype).replace("torch.", "")
        raise ModelError(f"quantize={quantize!r} needs dtype fp32 activations, not {name}")


def engine() -> str:
    """The quantized kernel library torch uses here (``x86`` / ``fbgemm`` on Intel and AMD CPUs)."""
    return torch.backends.quantized.engine


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and dynamically quantised int8 activations.

    The packed weight is a plain attribute, not a parameter: it is built from a loaded float
    Linear and is never part of a state dict.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()  # (out,)
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():  # torch flags its quantized tensor types as deprecated
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qw, bias)
        # fbgemm's AVX2 kernels need 7-bit activations to avoid int16 saturation.
        self._reduce_range = engine() in ("x86", "fbgemm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, self._reduce_range)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by an :class:`Int8Linear`; returns how many."""
    if engine() == "none":
        raise ModelError("this torch build has no quantized CPU kernels; run without quantize")
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                try:
                    setattr(parent, name, Int8Linear(child))
                except (RuntimeError, AttributeError) as e:
                    raise ModelError(f"int8 quantisation is not available in this torch build ({e})") from None
                count += 1
    return count
