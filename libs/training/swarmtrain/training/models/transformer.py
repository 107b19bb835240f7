"""The ``transformer`` kind (``common.models.TransformerSpec``): a pre-norm transformer over token
ids; a causal decoder with tied embeddings for language modelling, else a mean-pooling encoder."""

from __future__ import annotations

import torch
from torch import nn

from swarmtrain.common.models import DataShape, TransformerSpec
from swarmtrain.training.models.attention import SelfAttention
from swarmtrain.training.models.base import MODELS


class PreNormBlock(nn.Module):
    def __init__(self, spec: TransformerSpec, *, causal: bool) -> None:
        super().__init__()
        d = spec.d_model
        self.norm1 = nn.LayerNorm(d)
        rotary = spec.context if spec.positions == "rotary" else 0
        self.attn = SelfAttention(d, spec.heads, causal=causal, rotary_context=rotary)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, spec.mlp_ratio * d), nn.GELU(), nn.Linear(spec.mlp_ratio * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class Transformer(nn.Module):
    """``(batch, L)`` token ids (L at most ``context``) to ``(batch, L, vocab)`` logits (causal) or
    ``(batch, classes)``."""

    def __init__(self, spec: TransformerSpec, shape: DataShape) -> None:
        super().__init__()
        self.causal = spec.causal(shape)
        self.embed = nn.Embedding(shape.vocab, spec.d_model)
        self.positions = nn.Embedding(spec.context, spec.d_model) if spec.positions == "learned" else None
        self.blocks = nn.ModuleList(PreNormBlock(spec, causal=self.causal) for _ in range(spec.layers))
        self.norm = nn.LayerNorm(spec.d_model)
        self.head = None if self.causal else nn.Linear(spec.d_model, shape.classes)
        # embeddings of unit norm rows (std d_model ** -0.5, not torch's 1): the tied logits, a
        # normalized state dotted with them, start at O(1) instead of O(d_model)
        for table in (self.embed, self.positions):
            if table is not None:
                nn.init.normal_(table.weight, std=spec.d_model**-0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.embed(ids.long())
        if self.positions is not None:
            x = x + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.head is None:
            logits: torch.Tensor = x @ self.embed.weight.t()  # tied: the embedding is the output layer
            return logits
        pooled: torch.Tensor = self.head(x.mean(dim=1))
        return pooled


@MODELS.register("transformer")
def build(spec: TransformerSpec, shape: DataShape) -> list[nn.Module]:
    spec.check(shape)
    return [Transformer(spec, shape)]
