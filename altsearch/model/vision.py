"""CLIP ViT vision tower (pre-LN), attribute names mirroring ``vision_model.*`` checkpoint keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import layers as L
from .config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` with one temporary instead of three (the same numbers; the MLP's
    4096-wide activations make this ~3 % of a CPU forward pass)."""
    return x.mul(1.702).sigmoid_().mul_(x)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj = L.Linear(d, d)
        self.k_proj = L.Linear(d, d)
        self.v_proj = L.Linear(d, d)
        self.out_proj = L.Linear(d, d)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """Self-attention over all of x's tokens, for its first ``queries`` tokens (default all)."""
        b, t, d = x.shape  # (B, T, D)
        tq = t if queries is None else queries
        q = self.q_proj(x[:, :tq]).view(b, tq, self.heads, -1).transpose(1, 2)  # (B, H, Tq, d_h)
        k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v)  # scale = d_h ** -0.5
        return self.out_proj(a.transpose(1, 2).reshape(b, tq, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = L.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = L.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = L.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = L.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """The layer's output for the first ``queries`` tokens (default all): each token's output
        depends on the others only through attention's keys and values."""
        x = x[:, :queries] + self.self_attn(self.layer_norm1(x), queries)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, last_queries: int | None = None) -> torch.Tensor:
        """All layers; the last one computes only the first ``last_queries`` tokens (default all)."""
        for i, layer in enumerate(self.layers):
            x = layer(x, last_queries if i == len(self.layers) - 1 else None)
        return x


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.patch_embedding = L.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = L.Embedding(cfg.num_positions, d)

    def positions(self, gh: int, gw: int) -> torch.Tensor:
        """Position table for a gh x gw patch grid: the trained one, or bicubic-interpolated."""
        pos = self.position_embedding.weight  # (1 + g*g, D)
        g = self.cfg.grid
        if gh == g and gw == g:
            return pos
        cls, grid = pos[:1], pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])

    def forward(self, pixels: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        b, _, h, w = pixels.shape  # (B, 3, H, W)
        if not interpolate_pos_encoding and (h != self.cfg.image_size or w != self.cfg.image_size):
            raise ValueError(f"input image size {h}x{w} does not match the model's "
                             f"{self.cfg.image_size}x{self.cfg.image_size}; "
                             "pass interpolate_pos_encoding=True to allow other sizes")
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        cls = self.class_embedding.expand(b, 1, -1)
        return torch.cat([cls, x], dim=1) + self.positions(gh, gw)  # (B, 1 + gh*gw, D)


class VisionTransformer(nn.Module):
    """``vision_model``: pixels -> pooled CLS feature (before ``visual_projection``)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = L.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # (sic)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = L.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixels, interpolate_pos_encoding))  # (B, T, D)
        # Only the CLS token is pooled: the last layer skips the other 256 tokens' attention outputs
        # and MLP (the same numbers, ~3.5 % less arithmetic for ViT-L/14).
        x = self.encoder(x, last_queries=1)
        return self.post_layernorm(x[:, 0])  # (B, D)
