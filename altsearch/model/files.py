"""A checkpoint's files and identity, read without torch.

What an indexing run needs to know of its model before it embeds anything (where the files are, the
name an index records, the weights' fingerprint, the vector dimension, the preprocessing) comes from
here: a run that finds nothing new to embed never imports torch (about 2 s of a cold start) nor
loads a tower. :mod:`.weights` reads the tensors themselves.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from .config import AltCLIPConfig
from .resolve import resolve

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"

# Present in some files, harmless, never loaded: 4.x position/token-type buffers and the RoBERTa
# pooler that AltCLIP does not use.
_IGNORED = re.compile(r"(\.position_ids|\.token_type_ids)$|^text_model\.roberta\.pooler\.")
_LAYER = re.compile(r"\.encoder\.layer\.(\d+)\.")

# the tensors the fingerprint hashes (the projections and the logit scale: a few MB)
FINGERPRINT_KEYS = ("text_projection.weight", "visual_projection.weight", "logit_scale")
_HEADER_MAX = 100 << 20  # safetensors' own limit on a header


def canonical_key(key: str) -> str:
    """Map any known on-disk key to our module's key (the one pure renaming function).

    Hub files (transformers 4) say ``text_model.roberta.encoder.layer.N.``; files written by
    transformers 5 say ``encoder.layer.N.`` in both towers; our modules say ``encoder.layers.N.``.
    """
    key = _LAYER.sub(r".encoder.layers.\1.", key)
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    return key


def is_ignored(key: str) -> bool:
    return bool(_IGNORED.search(key))


def weight_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name (as stored) to the safetensors file holding it."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    single = folder / SAFETENSORS
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {k: folder / v for k, v in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
        return files
    if single.is_file():
        return {k: single for k in _keys(single)}
    if (folder / PYTORCH_BIN).is_file():
        raise CheckpointError(
            f"{folder} has only {PYTORCH_BIN} (a pickle, not read at run time); convert it once with: "
            f"altsearch model convert {folder} <new folder>")
    raise CheckpointError(f"{folder}: no weights found (looked for {SAFETENSORS} and {SAFETENSORS_INDEX})")


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _as_float16(path: Path, key: str) -> np.ndarray:
    """One float tensor of a safetensors file as float16, flat, rounded as torch's ``.to(torch.float16)``
    rounds (to nearest, ties to even). Read from the file's header and bytes: numpy has no bfloat16, and
    safetensors' numpy reader refuses it."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _HEADER_MAX:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
            entry = header[key]
            begin, end = entry["data_offsets"]
            f.seek(8 + size + begin)
            raw = f.read(end - begin)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path}: cannot read tensor {key} ({e})") from None
    kind = entry.get("dtype")
    if kind == "BF16":  # the top half of a float32
        values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    elif kind in ("F32", "F16", "F64"):
        values = np.frombuffer(raw, {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[kind])
    else:
        raise CheckpointError(f"{path}: tensor {key} is {kind}, not a float type")
    with np.errstate(over="ignore"):  # beyond float16's range: inf, as torch gives
        return values.astype(np.float16)


def fingerprint(files: dict[str, Path]) -> str:
    """A short content hash identifying the model, stable across file formats and fp32/fp16 copies.

    Hashes the two projection matrices and ``logit_scale`` (a few MB), rounded to fp16.
    """
    keys = [k for k in FINGERPRINT_KEYS if k in files]
    if len(keys) < 2:
        raise CheckpointError("cannot fingerprint the model: projection weights not found")
    h = hashlib.sha256()
    for name, key in sorted((canonical_key(k), k) for k in keys):
        h.update(name.encode())
        h.update(_as_float16(files[key], key).tobytes())
    return h.hexdigest()[:16]


@dataclass
class ModelFiles:
    """A checkpoint folder and what identifies it, read without torch (see the module docstring)."""

    path: Path
    source: str  # what an index records: a hub id, or a local folder's absolute path
    config: AltCLIPConfig = field(repr=False)
    tensors: dict[str, Path] = field(repr=False)

    @property
    def dimension(self) -> int:
        return self.config.projection_dim

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of the weights, recorded by indexes built with them."""
        return fingerprint(self.tensors)

    @cached_property
    def preprocess_config(self):
        from .preprocess import PreprocessConfig

        return PreprocessConfig.from_dir(self.path)


def locate(source: str | Path, *, download: bool = True) -> ModelFiles:
    """The files of the model ``source`` (a local folder or a hub id), fetched first if need be."""
    path = resolve(source, download=download)
    # A local folder is recorded by its absolute path, so an index built from it works from any folder.
    name = str(path.absolute()) if Path(source).expanduser().exists() else str(source)
    return ModelFiles(path, name, AltCLIPConfig.from_file(path / "config.json"), weight_files(path))
