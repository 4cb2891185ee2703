"""The CLIP-style causal text transformer and its projection into the joint space (SPEC §1.5)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xdecoder.config import TextConfig
from xdecoder.modeling.common import attend_projected, project_keys_values


class TFLayerNorm(nn.Module):
    """TF-style LayerNorm: eps 1e-12, computed in fp32 (the official text encoder's own class)."""

    def __init__(self, dim: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight * x.to(dtype) + self.bias


class QuickGELUMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, dim * 4)
        self.c_proj = nn.Linear(dim * 4, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.c_fc(x)
        return self.c_proj(x * torch.sigmoid(1.702 * x))


TextCache = list[tuple[Tensor, Tensor]]  # per block, keys and values of the positions so far


class ResidualAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_1 = TFLayerNorm(dim)
        self.mlp = QuickGELUMlp(dim)
        self.ln_2 = TFLayerNorm(dim)

    def forward(self, x: Tensor, causal_mask: Tensor) -> Tensor:  # x: [L, B, C]
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=causal_mask)[0]
        return x + self.mlp(self.ln_2(x))

    def step(self, x: Tensor, cache: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One new position x [1, B, C] attending to the cached earlier ones (causal by construction)."""
        y = self.ln_1(x)
        k, v = project_keys_values(self.attn, y)
        if cache is not None:
            k, v = torch.cat((cache[0], k)), torch.cat((cache[1], v))
        x = x + attend_projected(self.attn, y, k, v)
        return x + self.mlp(self.ln_2(x)), (k, v)


class TextTransformer(nn.Module):
    """Token ids [B, n<=77] -> hidden states [B, n, width]. Always causal: padding needs no mask,
    and a prefix of the ids gives exactly the prefix of the hidden states."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.resblocks: list[ResidualAttentionBlock] = nn.ModuleList(  # type: ignore[assignment]
            ResidualAttentionBlock(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln_final = TFLayerNorm(cfg.width)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, input_ids: Tensor) -> Tensor:
        n = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:n]
        mask = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        x = x.permute(1, 0, 2)
        for block in self.resblocks:
            x = block(x, mask)
        return self.ln_final(x.permute(1, 0, 2))

    def step(self, token_ids: Tensor, position: int, cache: TextCache) -> Tensor:
        """Hidden state [B, C] of the token at ``position`` (ids [B]); ``cache`` grows by one position."""
        x = (self.token_embedding(token_ids) + self.positional_embedding[position])[None]
        for i, block in enumerate(self.resblocks):
            x, kv = block.step(x, cache[i] if i < len(cache) else None)
            if i < len(cache):
                cache[i] = kv
            else:
                cache.append(kv)
        return self.ln_final(x[0])


class LanguageEncoder(nn.Module):
    """Text transformer + ``lang_proj`` + the learned ``logit_scale`` (official ``vlpencoder``)."""

    def __init__(self, cfg: TextConfig, dim_proj: int) -> None:
        super().__init__()
        self.lang_encoder = TextTransformer(cfg)
        self.lang_proj = nn.Parameter(torch.empty(cfg.width, dim_proj))
        self.logit_scale = nn.Parameter(torch.ones([]))
        nn.init.trunc_normal_(self.lang_proj, std=0.02)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (token embeddings [B, 77, D], sentence embeddings [B, D]), both unnormalized.

        The sentence embedding is taken at the first end-of-text token: argmax of the ids,
        since 49407 is the largest id and argmax returns its first occurrence.
        """
        hidden = self.lang_encoder(input_ids)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(-1)]
        return hidden @ self.lang_proj, pooled @ self.lang_proj

    def encode_trimmed(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``forward`` on the ids cut after the last sentence's end token: [B, n, D], [B, D].

        The encoder is causal, so positions up to each end token do not depend on the padding
        after it; class-name prompts are ~10 tokens, so this does ~1/7 of the work of 77.
        """
        n = int(input_ids.argmax(-1).max()) + 1
        return self(input_ids[:, :n])

    def step(self, token_ids: Tensor, position: int, cache: TextCache) -> Tensor:
        """Token embedding [B, D] (@ lang_proj) of one new position; see ``TextTransformer.step``."""
        return self.lang_encoder.step(token_ids, position, cache) @ self.lang_proj
