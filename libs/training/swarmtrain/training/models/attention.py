"""Multi-head self-attention as the transformer and the ``layers`` kind build it: one ``qkv``
projection and one output projection (``common.layers.attention_parameters``), torch's
scaled-dot-product attention, an optional causal mask and optional rotary positions."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ROTARY_BASE = 10_000.0


def rotary_tables(context: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles, ``(context, head_dim // 2)``."""
    inv = 1.0 / ROTARY_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(context, dtype=torch.float32)[:, None] * inv[None, :]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on ``x`` ``(batch, heads, L, head_dim)``: pairs (even, odd) rotated."""
    length = x.shape[-2]
    cos, sin = cos[:length].to(x.dtype), sin[:length].to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    """``(batch, L, D)`` to ``(batch, L, D)``."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, d: int, heads: int, *, causal: bool, rotary_context: int = 0) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.rotary = rotary_context > 0
        cos, sin = rotary_tables(max(rotary_context, 1), d // heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.rotary:
            q, k = rotate(q, self.cos, self.sin), rotate(k, self.cos, self.sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        out: torch.Tensor = self.out(y.transpose(1, 2).reshape(b, n, d))
        return out
