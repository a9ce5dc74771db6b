"""Frozen configuration of the AltCLIP towers, read from the checkpoint's own ``config.json``.

The library defaults of transformers' ``AltCLIPVisionConfig`` describe a ViT-B/32, while BAAI/AltCLIP
is a ViT-L/14: vision numbers are therefore always taken from the file, never assumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_TEXT_ACTS = {"gelu"}
_VISION_ACTS = {"quick_gelu"}


def _pick(cls, d: dict[str, Any], where: str):
    """Build dataclass ``cls`` from ``d``, ignoring unknown keys and checking the required ones."""
    kwargs = {}
    for f in fields(cls):
        if f.name in d and d[f.name] is not None:
            kwargs[f.name] = d[f.name]
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [f.name for f in fields(cls) if f.name not in kwargs]
        raise ConfigError(f"{where}: missing {', '.join(missing)}") from e
    obj.validate(where)
    return obj


@dataclass(frozen=True)
class TextConfig:
    """XLM-RoBERTa text tower plus AltCLIP's ``pre_LN`` and ``transformation`` head."""

    vocab_size: int = 250002
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    project_dim: int = 768

    def validate(self, where: str) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{where}: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _TEXT_ACTS:
            raise ConfigError(f"{where}: hidden_act {self.hidden_act!r} is not supported (expected 'gelu')")
        if self.max_position_embeddings <= self.pad_token_id + 2:
            raise ConfigError(f"{where}: max_position_embeddings {self.max_position_embeddings} too small")

    @property
    def max_tokens(self) -> int:
        """Longest token sequence the position table allows (positions start after the pad id)."""
        return self.max_position_embeddings - self.pad_token_id - 1


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower. No defaults for the size fields: they must come from the file."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def validate(self, where: str) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{where}: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _VISION_ACTS:
            raise ConfigError(f"{where}: hidden_act {self.hidden_act!r} is not supported "
                              "(expected 'quick_gelu')")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{where}: image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + 1


# The ViT-B/32 numbers transformers falls back to when a config omits vision fields. We only use them
# to fill gaps in configs that name *some* vision fields, exactly as transformers would.
_HF_VISION_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, image_size=224, patch_size=32)


@dataclass(frozen=True)
class AltCLIPConfig:
    text: TextConfig
    vision: VisionConfig
    projection_dim: int = 768

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config.json") -> "AltCLIPConfig":
        model_type = d.get("model_type")
        if model_type != "altclip":
            archs = ", ".join(d.get("architectures") or []) or "unknown"
            raise ConfigError(f"{where}: model_type is {model_type!r} (architectures: {archs}), "
                              "not an AltCLIP checkpoint (expected model_type 'altclip')")
        # Old hub configs carry text_config_dict / vision_config_dict; transformers merges them in.
        text = {**(d.get("text_config") or {}), **(d.get("text_config_dict") or {})}
        vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        if not vision:
            raise ConfigError(f"{where}: no vision_config; altsearch will not guess the vision tower "
                              "(the library default is ViT-B/32, BAAI/AltCLIP is ViT-L/14)")
        vision = {**_HF_VISION_DEFAULTS, **vision}
        proj = d.get("projection_dim", 768)
        if not isinstance(proj, int) or proj <= 0:
            raise ConfigError(f"{where}: projection_dim must be a positive integer, got {proj!r}")
        return cls(text=_pick(TextConfig, text, f"{where} text_config"),
                   vision=_pick(VisionConfig, vision, f"{where} vision_config"),
                   projection_dim=proj)

    @classmethod
    def from_file(cls, path: str | Path) -> "AltCLIPConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, where=str(path))
