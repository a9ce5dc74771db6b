"""altsearch: bilingual (Chinese / English) image search with AltCLIP, FAISS and SQLite.

Names are imported on first use, so ``import altsearch`` (and the CLI's start) stays fast.
"""

from __future__ import annotations

from importlib import import_module

from .errors import AltsearchError

__version__ = "0.1.0"

_LAZY = {
    "load_model": "altsearch.model",
    "Model": "altsearch.model",
    "Engine": "altsearch.engine",
    "Hit": "altsearch.engine",
    "IndexReport": "altsearch.ingest",
    "Progress": "altsearch.ingest",
}

__all__ = ["AltsearchError", "Engine", "Hit", "IndexReport", "Model", "Progress", "load_model", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'altsearch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
