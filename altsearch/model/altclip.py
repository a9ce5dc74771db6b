"""The AltCLIP model: both towers, their projections, and the user-facing :class:`Model`."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from . import layers as L
from . import quantize as Q
from . import weights as W
from .config import AltCLIPConfig
from .files import ModelFiles, locate
from .heap import reuse_heap
from .resolve import DEFAULT_MODEL
from .runtime import pick_device, pick_dtype, suggest_batch_size, vision_activation_bytes
from .text import TextTransformer
from .vision import VisionTransformer

log = logging.getLogger(__name__)

TOWERS = ("text", "vision")
TOWER_MODULES = {"text": "text_model", "vision": "vision_model"}
PROJECTIONS = {"text": "text_projection", "vision": "visual_projection"}
PACK_CALLS = 16  # CPU text encodings after which the text tower's weights are packed (Model.pack)


class AltCLIP(nn.Module):
    """Module tree mirroring the checkpoint keys (``text_model``, ``vision_model``, projections)."""

    def __init__(self, cfg: AltCLIPConfig):
        super().__init__()
        self.text_model = TextTransformer(cfg.text)
        self.vision_model = VisionTransformer(cfg.vision)
        self.text_projection = L.Linear(cfg.text.project_dim, cfg.projection_dim, bias=False)
        self.visual_projection = L.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(()))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                      padded: bool | None = None) -> torch.Tensor:
        """Unnormalised text embeddings, like ``AltCLIPModel.get_text_features``. (B, P)"""
        return self.text_projection(self.text_model(input_ids, attention_mask, padded=padded))

    def image_features(self, pixels: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Unnormalised image embeddings, like ``AltCLIPModel.get_image_features``. (B, P)"""
        return self.visual_projection(self.vision_model(pixels, interpolate_pos_encoding))


def _parameter_counts(module: AltCLIP) -> dict[str, int]:
    counts = {"text": 0, "vision": 0, "projections": 0, "logit_scale": 0}
    for name, p in module.named_parameters():
        group = ("text" if name.startswith("text_model.") else "vision" if name.startswith("vision_model.")
                 else "logit_scale" if name == "logit_scale" else "projections")
        counts[group] += p.numel()
    return counts


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``batch`` on ``device``; a CPU -> CUDA copy goes through pinned memory and does not block."""
    if batch.device == device:
        return batch
    if batch.device.type == "cpu" and device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


class Model:
    """A loaded AltCLIP checkpoint, ready to embed text and images.

    Each tower is read from disk the first time it is needed (a text query never reads the vision
    weights), or up front with ``towers=``. Safe to share between threads: loading is locked and
    inference runs under ``torch.inference_mode``.

    With ``quantize="int8"`` (CPU only) each tower's Linear layers are quantised right after its
    float32 weights are loaded (:mod:`.quantize`); the projections stay float32.
    """

    def __init__(self, files: ModelFiles, *, device: torch.device, dtype: torch.dtype,
                 max_length: int | None = None, quantize: str | None = None):
        from .tokenizer import DEFAULT_MAX_LENGTH

        self.files = files
        self.path = files.path
        self.source = files.source
        self.device = device
        self.dtype = dtype
        Q.check_mode(quantize, device, dtype)
        self.quantize = quantize
        self.quantized_layers: dict[str, int] = {}
        self.config = files.config
        self.max_length = min(max_length or DEFAULT_MAX_LENGTH, self.config.text.max_tokens)
        self._files = files.tensors
        with torch.device("meta"):
            self.module = AltCLIP(self.config).eval()
        self.module.requires_grad_(False)
        self._parameter_counts = _parameter_counts(self.module)  # before quantisation removes weights
        self._loaded: set[str] = set()
        self._lock = threading.RLock()
        self._tokenizer = None
        self._normalizer = None
        self._text_graphs = None  # CUDA graphs of the text tower (graphs.TextGraphs), made on first use
        self.pack_calls: int | None = PACK_CALLS
        self.packed_layers: dict[str, int] = {}
        self._text_calls = 0
        self.load_seconds: dict[str, float] = {}
        self._load_parts(["scale"])

    # -- loading ------------------------------------------------------------------------------

    @property
    def dimension(self) -> int:
        return self.config.projection_dim

    @property
    def preprocess_config(self):
        """The image preprocessing settings (read on first use: a text query never imports Pillow)."""
        return self.files.preprocess_config

    @property
    def fingerprint(self) -> str:
        """Content hash of this model's weights, recorded by indexes built with it."""
        return self.files.fingerprint

    @property
    def loaded_towers(self) -> tuple[str, ...]:
        return tuple(t for t in TOWERS if t in self._loaded)

    def load(self, towers: Sequence[str] = TOWERS) -> "Model":
        unknown = set(towers) - set(TOWERS)
        if unknown:
            raise ModelError(f"unknown tower(s) {', '.join(sorted(unknown))}; use text and/or vision")
        self._load_parts([t for t in towers if t not in self._loaded])
        return self

    def _load_parts(self, parts: Sequence[str]) -> None:
        with self._lock:
            for part in parts:
                if part in self._loaded:
                    continue
                t0 = time.perf_counter()
                prefixes = W.TOWER_PREFIXES[part]
                tensors = W.read_tensors(self._files, prefixes, self.dtype)
                if part == "scale":  # logit_scale stays fp32, as in the reference
                    tensors = {k: v.float() for k, v in tensors.items()}
                W.check_fit(self.module, tensors, prefixes, str(self.path))
                tensors = {k: v.to(self.device) for k, v in tensors.items()}
                W.load_into(self.module, tensors, prefixes)
                if self.quantize and part in TOWER_MODULES:
                    tower = getattr(self.module, TOWER_MODULES[part])
                    self.quantized_layers[part] = Q.quantize_linears(tower)
                self._loaded.add(part)
                self.load_seconds[part] = time.perf_counter() - t0
                log.debug("loaded %s tower of %s in %.2fs", part, self.path, self.load_seconds[part])

    def pack(self, towers: Sequence[str] = ("text",)) -> "Model":
        """Copy the towers' float32 Linear weights into oneDNN's blocked layout (CPU only; loads a
        tower first if needed): one text query then runs 1.3-1.4x faster on the CPU measured, for
        the weights' size in memory (1.2 GB for the full-size text tower) and a second or two once.
        A process does it by itself for the text tower on its ``pack_calls``-th CPU text encoding
        (16; None: never) where the copy takes at most a quarter of the memory available, so a
        one-off query never pays for it. Nothing happens on a GPU, with
        ``quantize`` or where oneDNN is not used (``packed_layers`` stays empty)."""
        self.load(towers)
        with self._lock:
            for part in towers:
                if part in self.packed_layers or self.linear_kernel != "onednn":
                    continue
                t0 = time.perf_counter()
                n = L.pack_linears(*self._tower_and_projection(part))
                if n:
                    self.packed_layers[part] = n
                    self.load_seconds[f"{part}_pack"] = seconds = time.perf_counter() - t0
                    log.debug("packed %d Linear weights of the %s tower in %.2fs", n, part, seconds)
        return self

    def _tower_and_projection(self, part: str) -> tuple[nn.Module, nn.Module]:
        return getattr(self.module, TOWER_MODULES[part]), getattr(self.module, PROJECTIONS[part])

    def _pack_if_room(self, part: str) -> None:
        """:meth:`pack` unless the copy would take more than a quarter of the memory still available."""
        from ..sysmem import available_memory

        need = L.linear_bytes(*self._tower_and_projection(part))
        free = available_memory()
        if free is not None and need * 4 > free:
            log.info("not packing the %s tower's weights: %d MB would be more than a quarter of the %d MB "
                     "available", part, need >> 20, free >> 20)
            return
        self.pack([part])

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                from .tokenizer import PIECES_ENV, Tokenizer
                pieces = os.environ.get(PIECES_ENV, "1") != "0"
                self._tokenizer = Tokenizer.from_dir(self.path, max_length=self.max_length, pieces=pieces)
                if self._tokenizer.vocab_size > self.config.text.vocab_size:
                    raise ModelError(f"{self.path}: tokenizer has {self._tokenizer.vocab_size} ids but the "
                                     f"text tower only {self.config.text.vocab_size} embeddings")
            return self._tokenizer

    @property
    def normalizer(self):
        with self._lock:
            if self._normalizer is None:
                from .preprocess import Normalizer
                self._normalizer = Normalizer(self.preprocess_config)
            return self._normalizer

    # -- embedding ------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """L2-normalised text embeddings, float32 (N, D)."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings")
        out = [np.zeros((0, self.dimension), np.float32)]
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenizer.encode(list(texts[i:i + batch_size]))
            feats = self.text_features(ids.to(self.device), mask.to(self.device))
            out.append(_unit(feats).cpu().numpy())
        return np.concatenate(out)

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised features (B, P) of token ids and mask already on the device (what
        :meth:`encode_text` runs after tokenizing). On CUDA, batches of short texts replay a recorded
        CUDA graph (:mod:`.graphs`); otherwise the tower runs (on a CPU keeping its freed blocks for
        its next layers unless ``ALTSEARCH_HEAP_REUSE=0``, :mod:`.heap`). Loads the text tower if it
        is not yet."""
        self.load(["text"])
        if self.device.type == "cuda":
            if self._text_graphs is None:
                from .graphs import TextGraphs

                self._text_graphs = TextGraphs(self.module.text_features, pad_id=self.config.text.pad_token_id,
                                               max_length=self.max_length, device=self.device)
            feats = self._text_graphs(ids, mask)
            if feats is not None:
                return feats
        if self.device.type == "cpu" and self.pack_calls is not None:
            self._text_calls += 1
            if self._text_calls == self.pack_calls:
                self._pack_if_room("text")
        with self._heap():
            return self.module.text_features(ids, mask)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised features (B, P) of normalised pixels (B, 3, H, W) already on the device in the
        model's dtype (what :meth:`encode_pixels` runs after normalising); on a CPU keeping the pass's
        freed blocks for its next layers unless ``ALTSEARCH_HEAP_REUSE=0`` (:mod:`.heap`). Loads the
        vision tower if it is not yet."""
        self.load(["vision"])
        with self._heap():
            return self.module.image_features(pixels)

    def _heap(self) -> AbstractContextManager:
        return reuse_heap() if self.device.type == "cpu" else nullcontext()

    @torch.inference_mode()
    def encode_image(self, images: Sequence, *, batch_size: int = 32, draft: int | None = None) -> np.ndarray:
        """L2-normalised image embeddings, float32 (N, D), from PIL images or file paths.

        ``draft`` enables reduced-size JPEG decoding (shortest edge kept >= ``draft`` pixels).
        """
        from .preprocess import open_image, resize_crop

        if isinstance(images, (str, os.PathLike)):
            raise TypeError("encode_image takes a list of images or paths")
        out = [np.zeros((0, self.dimension), np.float32)]
        for i in range(0, len(images), batch_size):
            chunk = [resize_crop(open_image(im, draft=draft), self.preprocess_config)
                     for im in images[i:i + batch_size]]
            out.append(self.encode_pixels(np.stack(chunk)))
        return np.concatenate(out)

    @torch.inference_mode()
    def encode_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embed already resized and cropped uint8 images (B, H, W, 3); normalisation runs on the device.

        On CUDA the uint8 batch (4x smaller than floats) is copied from pinned memory without
        blocking, normalised on the GPU straight into the model's dtype, and the only wait is for
        the (B, D) result.
        """
        batch = _to_device(torch.as_tensor(pixels), self.device)
        feats = self.image_features(self.normalizer(batch, dtype=self.dtype))
        return _unit(feats).cpu().numpy()  # the one synchronisation per batch

    @torch.inference_mode()
    def logits(self, images: Sequence, texts: Sequence[str]) -> np.ndarray:
        """``logits_per_image`` (N_images, N_texts) as in ``AltCLIPModel``: cosine x exp(logit_scale)."""
        scale = float(self.module.logit_scale.float().exp())
        return (self.encode_image(images) @ self.encode_text(texts).T) * scale

    def classify(self, image, labels: Sequence[str]) -> dict[str, float]:
        """Zero-shot classification: softmax over ``labels`` for one image, best first."""
        logits = self.logits([image], labels)[0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return dict(sorted(zip(labels, p.tolist()), key=lambda kv: -kv[1]))

    def suggest_batch_size(self, *, maximum: int = 512, cpu_batch: int = 16) -> int:
        """Images per :meth:`encode_pixels` call: on CUDA as many as fit in the free device memory
        left once the vision tower is loaded (:func:`.runtime.suggest_batch_size`); ``cpu_batch``
        on other devices, where larger batches are no faster."""
        if self.device.type != "cuda":
            return cpu_batch
        self.load(["vision"])
        free, _total = torch.cuda.mem_get_info(self.device)
        return suggest_batch_size(free, vision_activation_bytes(self.config.vision, self.dtype), maximum=maximum)

    def info(self) -> dict:
        """Architecture, parameter counts, files and how it runs, without loading any tower."""
        c = self.config
        counts = self._parameter_counts
        return {
            "source": self.source, "path": str(self.path),
            "text": {"layers": c.text.num_hidden_layers, "width": c.text.hidden_size,
                     "heads": c.text.num_attention_heads, "vocab": c.text.vocab_size,
                     "max_tokens": self.max_length},
            "vision": {"layers": c.vision.num_hidden_layers, "width": c.vision.hidden_size,
                       "heads": c.vision.num_attention_heads, "patch": c.vision.patch_size,
                       "image_size": c.vision.image_size},
            "dimension": c.projection_dim,
            "parameters": {**counts, "total": sum(counts.values())},
            "files": sorted(p.name for p in self.path.iterdir() if p.is_file()),
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "quantize": self.quantize and {"mode": self.quantize, "engine": Q.engine(),
                                           "quantized_linear_layers": dict(self.quantized_layers)},
            "linear": self.linear_kernel, "packed_linear_layers": dict(self.packed_layers),
        }

    @property
    def linear_kernel(self) -> str:
        """What the towers' Linear layers multiply with: ``"int8"`` (``quantize``), ``"onednn"`` (float32
        on an x86-64 CPU, :mod:`.layers`) or ``"torch"`` (torch's own: cuBLAS on CUDA, BLAS on CPU)."""
        if self.quantize:
            return self.quantize
        if self.device.type == "cpu" and self.dtype == torch.float32:
            return L.onednn.kernel()
        return "torch"

    def __repr__(self) -> str:
        quant = f", quantize={self.quantize!r}" if self.quantize else ""
        return (f"Model({self.source!r}, device={self.device}, dtype={self.dtype}{quant}, "
                f"loaded={list(self.loaded_towers)})")


def load_model(source: str | os.PathLike | ModelFiles = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto",
               towers: Sequence[str] = (), max_length: int | None = None, download: bool = True,
               quantize: str | None = None) -> Model:
    """Load an AltCLIP checkpoint from a local folder or a Hugging Face hub id (or files already
    located, :func:`.files.locate`).

    ``towers`` loads ``"text"`` and/or ``"vision"`` now; by default each loads on first use.
    ``max_length`` caps text tokens (default 77, as BAAI's own inference).
    ``quantize="int8"`` (CPU, fp32 activations: what ``dtype="auto"`` then picks) quantises the
    towers' Linear layers as they load: faster on CPUs with fast int8 arithmetic, with vectors
    close to (not equal to) the float32 ones.
    """
    dev = pick_device(device)
    dt = torch.float32 if quantize and dtype == "auto" else pick_dtype(dtype, dev)
    Q.check_mode(quantize, dev, dt)  # before any download
    files = source if isinstance(source, ModelFiles) else locate(source, download=download)
    model = Model(files, device=dev, dtype=dt, max_length=max_length, quantize=quantize)
    return model.load(towers) if towers else model
