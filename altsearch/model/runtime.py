"""Choosing the device and dtype a model runs with."""

from __future__ import annotations

import torch

from ..errors import ModelError
from .config import VisionConfig

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA, then Apple MPS, then CPU. Anything else is checked to exist."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but this torch build sees no CUDA GPU")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError(f"device {device!r} asked for, but MPS is not available")
    return dev


# CPU features that make bf16 matrix products faster than fp32 ones (oneDNN uses them); without
# them torch emulates bf16 and runs several times slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where there is no ``/proc/cpuinfo``)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: bf16 on CUDA GPUs that support it, fp16 on other GPUs; on CPU bf16 when the CPU
    has native bf16 arithmetic (:data:`NATIVE_BF16_FLAGS`), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_flags() & NATIVE_BF16_FLAGS else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r} (use auto, fp32, fp16 or bf16)") from None


def vision_activation_bytes(vision: VisionConfig, dtype: torch.dtype) -> int:
    """Upper bound of the device memory one image's activations take in the vision tower at inference.

    Layers run one after another and free their temporaries, so the peak is one layer's: the
    residual stream, its LayerNorm, q, k, v and the attention output (6 x T x D), the MLP's hidden
    activations and quick-GELU's temporaries (3 x T x F), an H x T x T attention matrix (as if
    attention ran without a fused kernel), and the uint8 pixels with their int32 lookup index.
    """
    t, d, f = vision.num_positions, vision.hidden_size, vision.intermediate_size
    elements = 6 * t * d + 3 * t * f + vision.num_attention_heads * t * t
    pixels = vision.num_channels * vision.image_size**2 * (1 + 4)
    return elements * torch.empty((), dtype=dtype).element_size() + pixels


def suggest_batch_size(free_bytes: int, per_image_bytes: int, *, headroom: float = 0.5,
                       maximum: int = 512) -> int:
    """Images per batch whose activations fill at most ``headroom`` of ``free_bytes`` of device memory.

    Rounded down to a multiple of 8 (GPU matrix units work in tiles of 8) when that leaves one,
    capped at ``maximum`` (throughput stops growing long before), and at least 1.
    """
    if free_bytes < 0 or per_image_bytes <= 0 or not 0 < headroom <= 1 or maximum < 1:
        raise ValueError("suggest_batch_size needs free_bytes >= 0, per_image_bytes > 0, "
                         "0 < headroom <= 1 and maximum >= 1")
    n = min(int(free_bytes * headroom) // per_image_bytes, maximum)
    return max(1, n // 8 * 8 if n >= 8 else n)
