"""AltCLIP in plain PyTorch: configuration, towers, weights, tokenizer, preprocessing.

Names are imported on first use: decode workers import :mod:`.preprocess` from this package and
must not pay for (or be disturbed by) importing torch.
"""

from __future__ import annotations

from importlib import import_module

_LAZY = {
    "AltCLIP": ".altclip",
    "Model": ".altclip",
    "load_model": ".altclip",
    "AltCLIPConfig": ".config",
    "TextConfig": ".config",
    "VisionConfig": ".config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
