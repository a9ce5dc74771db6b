"""Reading AltCLIP weights from Hugging Face files: key layouts, strict loading, conversion.

Only safetensors are read at run time (memory-mapped, one tower at a time). ``pytorch_model.bin``
is read solely by :func:`convert_checkpoint`, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import CheckpointError
from .files import (  # noqa: F401  (re-exported: the key layouts and file names live there, free of torch)
    PYTORCH_BIN,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    canonical_key,
    fingerprint,
    is_ignored,
    weight_files,
)

log = logging.getLogger(__name__)

TOWER_PREFIXES = {
    "text": ("text_model.", "text_projection."),
    "vision": ("vision_model.", "visual_projection."),
    "scale": ("logit_scale",),
}


def read_tensors(files: dict[str, Path], prefixes: Iterable[str], dtype: torch.dtype | None = None,
                 ) -> dict[str, torch.Tensor]:
    """Read the tensors whose name starts with one of ``prefixes``, renamed to module keys.

    Tensors are read one at a time from the memory map and cast to ``dtype`` right away, so the
    peak is one copy of the selected weights (no full fp32 copy when running fp16).
    """
    prefixes = tuple(prefixes)
    wanted: dict[Path, list[str]] = {}
    for key, path in files.items():
        if key.startswith(prefixes) and not is_ignored(key):
            wanted.setdefault(path, []).append(key)
    out: dict[str, torch.Tensor] = {}
    for path, keys in wanted.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in keys:
                    t = f.get_tensor(key)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    out[canonical_key(key)] = t
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read tensors ({e})") from None
    return out


def check_fit(module: nn.Module, tensors: dict[str, torch.Tensor], prefixes: Iterable[str],
              where: str) -> None:
    """Strict check: every expected key present with its shape, nothing unexpected."""
    prefixes = tuple(prefixes)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if k.startswith(prefixes)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(f"{k} {tuple(tensors[k].shape)} in file vs {expected[k]} in config"
                    for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if items:
                shown = "; ".join(items[:4]) + (f"; ... ({len(items) - 4} more)" if len(items) > 4 else "")
                parts.append(f"{len(items)} {name}: {shown}")
        raise CheckpointError(f"{where}: weights do not fit config.json: " + " | ".join(parts))


def load_into(module: nn.Module, tensors: dict[str, torch.Tensor], prefixes: Iterable[str]) -> None:
    """Assign ``tensors`` (checked by :func:`check_fit`) into a meta-device module without copying."""
    prefixes = tuple(prefixes)
    module.load_state_dict(tensors, strict=False, assign=True)
    leftovers = [n for n, p in module.named_parameters() if p.is_meta and n.startswith(prefixes)]
    if leftovers:  # a tower that was asked for must be complete
        raise CheckpointError(f"parameters left unloaded: {', '.join(leftovers[:4])}")


def convert_checkpoint(src: Path, dst: Path) -> list[str]:
    """Write a safetensors (and tokenizer.json) copy of checkpoint ``src`` into ``dst``.

    Reads ``pytorch_model.bin`` with ``torch.load(weights_only=True)``: no code in the file runs.
    Returns the names of the files written.
    """
    from safetensors.torch import save_file

    from .tokenizer import convert_sentencepiece

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder")
    if dst.resolve() == src.resolve():
        raise CheckpointError("convert needs a destination folder different from the source")
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "sentencepiece.bpe.model"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            written.append(name)
    if (src / SAFETENSORS).is_file() or (src / SAFETENSORS_INDEX).is_file():
        for p in src.glob("*.safetensors*"):
            shutil.copy2(p, dst / p.name)
            written.append(p.name)
    elif (src / PYTORCH_BIN).is_file():
        try:
            sd = torch.load(src / PYTORCH_BIN, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, OSError, EOFError) as e:  # pickle.UnpicklingError is a RuntimeError subclass here
            raise CheckpointError(f"{src / PYTORCH_BIN}: cannot read ({str(e).splitlines()[0]})") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{src / PYTORCH_BIN}: does not hold a state dict")
        sd = {k: v.contiguous().clone() if _shares_storage(v, sd) else v.contiguous()
              for k, v in sd.items() if isinstance(v, torch.Tensor)}
        save_file(sd, str(dst / SAFETENSORS), metadata={"format": "pt"})
        written.append(SAFETENSORS)
    else:
        raise CheckpointError(f"{src}: no weights found ({SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN})")
    if not (dst / "tokenizer.json").is_file() and (src / "sentencepiece.bpe.model").is_file():
        convert_sentencepiece(src / "sentencepiece.bpe.model", dst / "tokenizer.json")
        written.append("tokenizer.json")
    return written


def _shares_storage(t: torch.Tensor, sd: dict) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for v in sd.values()
               if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == ptr) > 1
