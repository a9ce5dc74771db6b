"""XLM-RoBERTa text tower (post-LN) with AltCLIP's ``pre_LN`` + ``transformation`` head.

Attribute names mirror the ``text_model.*`` checkpoint keys (transformers-5 module names, i.e.
``encoder.layers.N``; files that say ``encoder.layer.N`` are renamed in :mod:`.weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import layers as L
from .config import TextConfig


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.query = L.Linear(d, d)
        self.key = L.Linear(d, d)
        self.value = L.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, queries: int | None = None) -> torch.Tensor:
        """Attention over all of x's tokens, for its first ``queries`` tokens (default all)."""
        b, t, d = x.shape  # (B, T, D)
        tq = t if queries is None else queries
        q = self.query(x[:, :tq]).view(b, tq, self.heads, -1).transpose(1, 2)  # (B, H, Tq, d_h)
        k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return a.transpose(1, 2).reshape(b, tq, d)


class DenseLayerNorm(nn.Module):
    """``dense`` then residual add then ``LayerNorm`` (the post-LN sub-block of BERT/RoBERTa)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = L.Linear(d_in, d_out)
        self.LayerNorm = L.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = DenseLayerNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, queries: int | None = None) -> torch.Tensor:
        return self.output(self.self(x, mask, queries), x[:, :queries])


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = L.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU


class TextLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseLayerNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, queries: int | None = None) -> torch.Tensor:
        """The layer's output for the first ``queries`` tokens (default all)."""
        x = self.attention(x, mask, queries)
        return self.output(self.intermediate(x), x)


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(TextLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, last_queries: int | None = None) -> torch.Tensor:
        """All layers; the last one computes only the first ``last_queries`` tokens (default all)."""
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, last_queries if i == len(self.layers) - 1 else None)
        return x


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.pad_id = cfg.pad_token_id
        d = cfg.hidden_size
        self.word_embeddings = L.Embedding(cfg.vocab_size, d)
        self.position_embeddings = L.Embedding(cfg.max_position_embeddings, d)
        self.token_type_embeddings = L.Embedding(cfg.type_vocab_size, d)
        self.LayerNorm = L.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # fairseq positions: real tokens count from pad_id + 1, pads sit at pad_id.
        real = (input_ids != self.pad_id).long()  # (B, T)
        positions = torch.cumsum(real, dim=1) * real + self.pad_id
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])
        return self.LayerNorm(x)  # (B, T, D)


class Roberta(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = TextEncoder(cfg)


class TextTransformer(nn.Module):
    """``text_model``: token ids -> the ``<s>`` feature after ``transformation`` (before ``text_projection``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.roberta = Roberta(cfg)
        self.pre_LN = L.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.transformation = L.Linear(cfg.hidden_size, cfg.project_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                padded: bool | None = None) -> torch.Tensor:
        """``padded``: whether ``attention_mask`` masks anything; None finds out (a wait for the device),
        True applies it regardless (what a CUDA graph records: no host synchronisation)."""
        x = self.roberta.embeddings(input_ids)  # (B, T, D)
        mask = None
        if padded is None:
            padded = attention_mask is not None and not bool(attention_mask.all())
        if padded and attention_mask is not None:
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T): True = attend
        # Only <s> is used: the last layer computes only its output, and pre_LN and transformation
        # (which act on every position in the reference) only on it; the same numbers, less work.
        x = self.roberta.encoder(x, mask, last_queries=1)
        return self.transformation(self.pre_LN(x[:, 0]))  # (B, P)
