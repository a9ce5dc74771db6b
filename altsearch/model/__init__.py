"""AltCLIP in plain PyTorch: configuration, towers, weights, tokenizer, preprocessing."""

from .altclip import AltCLIP, Model, load_model
from .config import AltCLIPConfig, TextConfig, VisionConfig

__all__ = ["AltCLIP", "AltCLIPConfig", "Model", "TextConfig", "VisionConfig", "load_model"]
