"""The X-Decoder transformer decoder: latent queries, text queries, and the shared heads (SPEC §1.4).

Three ways to run it, all over the same pixel-decoder output:
* ``forward``: segmentation / retrieval — Q latent queries (the last one is the class query);
* ``ground``: referring segmentation — Q-1 copies of the object queries talk to the phrase tokens;
* ``caption_logits``: one greedy captioning step — 77 caption-token queries after the Q latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xdecoder.config import DecoderConfig, TextConfig
from xdecoder.modeling.common import (
    MLP,
    attend_projected,
    project_keys_values,
    resize_masks,
    sine_position_embedding,
)
from xdecoder.modeling.text_encoder import LanguageEncoder


@dataclass
class HeadOutput:
    embeddings: Tensor  # [B, N, D] head input @ class_embed ("pred_captions" officially)
    masks: Tensor  # [B, N, H/4, W/4] mask logits
    attn_mask: Tensor  # [B*heads, N, h*w] bool, True = blocked, for the next cross-attention
    logits: Tensor | None = None  # [B, N, K+1] when class text embeddings were given
    caption_features: Tensor | None = None  # [B, 77, D] captioning mode only
    # Segmentation pass only: per layer, the latent queries after cross-attention ([Q, B, D]),
    # which is all that caption tokens ever see of them (see ``caption_start``).
    latents: list[Tensor] | None = None


@dataclass
class CaptionState:
    """Incremental greedy captioning of a batch: everything earlier steps computed, by layer."""

    memory_kv: list[tuple[Tensor, Tensor]]  # cross-attention keys/values of the memory
    latent_kv: list[tuple[Tensor, Tensor]]  # self-attention keys/values of the latent queries
    caption_kv: list[tuple[Tensor, Tensor]]  # self-attention keys/values of caption tokens so far
    region_rows: list[Tensor] | None  # per level [B*heads, 1, h*w] bool, True = outside the region


@dataclass
class Memory:
    src: list[Tensor]  # per level [hw, B, D], level embedding added
    pos: list[Tensor]  # per level [hw, B, D]
    sizes: list[tuple[int, int]]


class CrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor | None, pos: Tensor, query_pos: Tensor) -> Tensor:
        out = self.multihead_attn(x + query_pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        return self.norm(x + out)

    def attend(self, x: Tensor, query_pos: Tensor, keys: Tensor, values: Tensor,
               mask: Tensor | None = None) -> Tensor:
        """``forward`` over memory keys/values projected once (``project_keys_values``)."""
        return self.norm(x + attend_projected(self.multihead_attn, x + query_pos, keys, values, mask))


class SelfAttentionLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor, query_pos: Tensor) -> Tensor:
        q = k = x + query_pos
        return self.norm(x + self.self_attn(q, k, x, attn_mask=mask, need_weights=False)[0])

    def attend(self, x: Tensor, query_pos: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Rows ``x`` of a longer sequence attend to its (cached) keys and values, unmasked."""
        return self.norm(x + attend_projected(self.self_attn, x + query_pos, keys, values))


class FFNLayer(nn.Module):
    def __init__(self, dim: int, dim_feedforward: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


def fixed_self_attn_mask(num_queries: int, context_length: int) -> Tensor:
    """The released ``self_attn_mask`` [1, Q+77, Q+77] (True = blocked).

    Object queries and the class query do not see each other nor the caption tokens;
    caption tokens see every latent query and attend causally among themselves.
    """
    q, n = num_queries, num_queries + context_length
    mask = torch.zeros(1, n, n, dtype=torch.bool)
    mask[:, :q, q:] = True
    mask[:, q:, q:] = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1)
    mask[:, : q - 1, q - 1] = True
    mask[:, q - 1, : q - 1] = True
    return mask


def unblock_full_rows(attn_mask: Tensor) -> Tensor:
    """A row that may attend nowhere attends everywhere instead (it would give NaN otherwise)."""
    return attn_mask & ~attn_mask.all(-1, keepdim=True)


class TransformerDecoder(nn.Module):
    self_attn_mask: Tensor
    def __init__(self, cfg: DecoderConfig, text: TextConfig, dim_proj: int) -> None:
        super().__init__()
        d, q = cfg.hidden_dim, cfg.num_queries
        self.num_queries, self.num_heads, self.num_layers = q, cfg.num_heads, cfg.num_layers
        self.context_length = text.context_length
        self.class_embed = nn.Parameter(torch.empty(d, dim_proj))
        self.caping_embed = nn.Parameter(torch.empty(d, dim_proj))
        self.register_buffer("self_attn_mask", fixed_self_attn_mask(q, text.context_length))
        self.transformer_self_attention_layers: list[SelfAttentionLayer] = nn.ModuleList(  # type: ignore[assignment]
            SelfAttentionLayer(d, cfg.num_heads) for _ in range(cfg.num_layers))
        self.transformer_cross_attention_layers: list[CrossAttentionLayer] = nn.ModuleList(  # type: ignore[assignment]
            CrossAttentionLayer(d, cfg.num_heads) for _ in range(cfg.num_layers))
        self.transformer_ffn_layers: list[FFNLayer] = nn.ModuleList(  # type: ignore[assignment]
            FFNLayer(d, cfg.dim_feedforward) for _ in range(cfg.num_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(q, d)
        self.query_embed = nn.Embedding(q, d)
        self.level_embed = nn.Embedding(3, d)
        self.lang_encoder: LanguageEncoder = LanguageEncoder(text, dim_proj)
        self.mask_embed = MLP(d, d, d, 3)
        self.pos_embed_caping = nn.Embedding(text.context_length, d)
        nn.init.trunc_normal_(self.class_embed, std=0.02)
        nn.init.trunc_normal_(self.caping_embed, std=0.02)

    # -- shared pieces -----------------------------------------------------------------------

    def memory(self, multi_scale: list[Tensor]) -> Memory:
        src, pos, sizes = [], [], []
        for i, x in enumerate(multi_scale):
            sizes.append((x.shape[-2], x.shape[-1]))
            pos.append(sine_position_embedding(x, x.shape[1] // 2).flatten(2).permute(2, 0, 1))
            src.append((x.flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        return Memory(src, pos, sizes)

    def class_logits(self, embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
        """exp(logit_scale) * cos(embedding, class text); unclamped, as for segmentation."""
        v = embeddings / (embeddings.norm(dim=-1, keepdim=True) + 1e-7)
        return self.lang_encoder.logit_scale.exp() * v @ text_embeddings.t()

    def heads(self, output: Tensor, mask_features: Tensor, target_size: tuple[int, int], *,
              text_embeddings: Tensor | None = None, grounding: bool = False,
              captioning: bool = False) -> HeadOutput:
        q = self.num_queries
        d = self.decoder_norm(output).transpose(0, 1)
        caption_features = d[:, q:] @ self.caping_embed if captioning else None
        # The class query's head input is a softmax-pooled mix of the object outputs; the
        # residual stream keeps the class query's own state.
        dn = d / (d.norm(dim=-1, keepdim=True) + 1e-7)
        sim = (dn[:, q - 1:q] @ dn[:, : q - 1].transpose(1, 2)).softmax(-1)[:, 0, :, None]
        pooled = (sim * d[:, : q - 1]).sum(dim=1, keepdim=True)
        parts = [d[:, : q - 1], pooled] + ([d[:, q:2 * q - 1]] if grounding else [])
        d = torch.cat(parts, dim=1)
        embeddings = d @ self.class_embed
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(d), mask_features)
        attn = resize_masks(masks, target_size).sigmoid().flatten(2) < 0.5
        attn = attn.unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1).detach()
        attn[:, q:q + 1] = False  # official quirk: the first query after the class query is never masked
        logits = self.class_logits(embeddings, text_embeddings) if text_embeddings is not None else None
        return HeadOutput(embeddings, masks, attn, logits, caption_features)

    def _queries(self, batch: int) -> tuple[Tensor, Tensor]:
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
        return output, query_pos

    def _latent_self_mask(self, batch: int) -> Tensor:
        q = self.num_queries
        return self.self_attn_mask[:, :q, :q].repeat(batch * self.num_heads, 1, 1)

    # -- the three modes ---------------------------------------------------------------------

    def forward(self, multi_scale: list[Tensor], mask_features: Tensor,
                text_embeddings: Tensor | None = None, *, return_stages: bool = False
                ) -> HeadOutput | list[HeadOutput]:
        """Segmentation / retrieval pass. Returns the last head (or every head)."""
        mem = self.memory(multi_scale)
        batch = mask_features.shape[0]
        output, query_pos = self._queries(batch)
        self_mask = self._latent_self_mask(batch)
        head = self.heads(output, mask_features, mem.sizes[0], text_embeddings=text_embeddings)
        stages = [head]
        latents = []
        for i in range(self.num_layers):
            level = i % len(mem.sizes)
            output = self.transformer_cross_attention_layers[i](
                output, mem.src[level], unblock_full_rows(head.attn_mask), mem.pos[level], query_pos)
            latents.append(output)
            output = self.transformer_self_attention_layers[i](output, self_mask, query_pos)
            output = self.transformer_ffn_layers[i](output)
            head = self.heads(output, mask_features, mem.sizes[(i + 1) % len(mem.sizes)],
                              text_embeddings=text_embeddings)
            stages.append(head)
        head.latents = latents
        return stages if return_stages else head

    def ground(self, multi_scale: list[Tensor], mask_features: Tensor, tokens: Tensor) -> HeadOutput:
        """Referring mode. ``tokens`` [T, B, D]: every valid token of every phrase, concatenated.

        Returns the head over the Q-1 grounding queries (masks and embeddings).
        """
        q = self.num_queries
        mem = self.memory(multi_scale)
        batch = mask_features.shape[0]
        output, query_pos = self._queries(batch)
        output = torch.cat((output, output[:-1]), dim=0)
        query_pos = torch.cat((query_pos, query_pos[:-1]), dim=0)
        n = 2 * q - 1 + tokens.shape[0]
        # Latents see only the fixed mask; grounding copies and tokens see each other freely.
        self_mask = torch.ones(1, n, n, dtype=torch.bool, device=tokens.device)
        self_mask[:, :q, :q] = self.self_attn_mask[:, :q, :q]
        self_mask[:, q:, q:] = False
        self_mask = self_mask.repeat(batch * self.num_heads, 1, 1)
        token_states = tokens
        head = self.heads(output, mask_features, mem.sizes[0], grounding=True)
        for i in range(self.num_layers):
            level = i % len(mem.sizes)
            output = self.transformer_cross_attention_layers[i](
                output, mem.src[level], unblock_full_rows(head.attn_mask), mem.pos[level], query_pos)
            output = torch.cat((output, token_states), dim=0)
            output = self.transformer_self_attention_layers[i](
                output, self_mask, torch.cat((query_pos, tokens), dim=0))
            output = self.transformer_ffn_layers[i](output)
            output, token_states = output[: 2 * q - 1], output[2 * q - 1:]
            head = self.heads(output, mask_features, mem.sizes[(i + 1) % len(mem.sizes)], grounding=True)
        return HeadOutput(head.embeddings[:, q:], head.masks[:, q:], head.attn_mask)

    def caption_features(self, mem: Memory, mask_features: Tensor, token_embeddings: Tensor,
                         region_block: list[Tensor] | None = None) -> Tensor:
        """One captioning pass; returns the caption-token features [B, 77, D] of the last head.

        ``token_embeddings`` [B, 77, D] are the text encoder's outputs for the current buffer.
        ``region_block`` (per level, [B, h*w] bool) blocks memory outside a region for the caption rows.
        """
        batch = mask_features.shape[0]
        latents, latent_pos = self._queries(batch)
        c = token_embeddings.transpose(0, 1)
        output = torch.cat((latents, c), dim=0)
        query_pos = torch.cat((latent_pos, c + self.pos_embed_caping.weight.unsqueeze(1)), dim=0)
        self_mask = self.self_attn_mask.repeat(batch * self.num_heads, 1, 1)
        head = self.heads(output, mask_features, mem.sizes[0], captioning=True)
        for i in range(self.num_layers):
            level = i % len(mem.sizes)
            attn = unblock_full_rows(head.attn_mask)
            rows = torch.zeros_like(attn[:, : self.context_length])
            if region_block is not None:
                rows[:] = region_block[level].repeat_interleave(self.num_heads, 0)[:, None]
            attn = torch.cat((attn, rows), dim=1)
            output = self.transformer_cross_attention_layers[i](
                output, mem.src[level], attn, mem.pos[level], query_pos)
            output = self.transformer_self_attention_layers[i](output, self_mask, query_pos)
            output = self.transformer_ffn_layers[i](output)
            head = self.heads(output, mask_features, mem.sizes[(i + 1) % len(mem.sizes)], captioning=True)
        assert head.caption_features is not None
        return head.caption_features

    def caption_start(self, mem: Memory, latents: list[Tensor], region_block: list[Tensor] | None = None
                      ) -> CaptionState:
        """Prepare incremental captioning (``caption_step``) for a batch.

        ``latents``: per layer the latent queries after cross-attention ([Q, B, D], from the
        segmentation pass, ``HeadOutput.latents``); latent queries never attend to caption
        tokens, so these are their states in every captioning step too. ``region_block``
        (per level, [B, h*w] bool) blocks memory outside a region for the caption tokens.
        """
        batch = latents[0].shape[1]
        latent_pos = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
        levels = len(mem.sizes)
        memory_kv = [project_keys_values(layer.multihead_attn, mem.src[i % levels], mem.pos[i % levels])
                     for i, layer in enumerate(self.transformer_cross_attention_layers)]
        latent_kv = [project_keys_values(layer.self_attn, latents[i], latent_pos)
                     for i, layer in enumerate(self.transformer_self_attention_layers)]
        rows = None
        if region_block is not None:
            rows = [unblock_full_rows(b.repeat_interleave(self.num_heads, 0)[:, None]) for b in region_block]
        return CaptionState(memory_kv, latent_kv, [], rows)

    def caption_step(self, state: CaptionState, token_embedding: Tensor, position: int) -> Tensor:
        """Caption features [B, D] at ``position`` given the text encoder's embedding of the token
        there ([B, D]); earlier positions come from ``state``, which this call extends.

        Equal to row ``position`` of ``caption_features`` over the full 77-slot buffer (up to
        float summation order): caption tokens attend causally, so later slots cannot change it.
        """
        x = token_embedding[None]
        pos = x + self.pos_embed_caping.weight[position]
        levels = len(self.level_embed.weight)
        for i in range(self.num_layers):
            mask = state.region_rows[i % levels] if state.region_rows is not None else None
            x = self.transformer_cross_attention_layers[i].attend(x, pos, *state.memory_kv[i], mask=mask)
            self_layer = self.transformer_self_attention_layers[i]
            k, v = project_keys_values(self_layer.self_attn, x, pos)
            if len(state.caption_kv) > i:
                k, v = torch.cat((state.caption_kv[i][0], k)), torch.cat((state.caption_kv[i][1], v))
                state.caption_kv[i] = (k, v)
            else:
                state.caption_kv.append((k, v))
            latent_k, latent_v = state.latent_kv[i]
            x = self_layer.attend(x, pos, torch.cat((latent_k, k)), torch.cat((latent_v, v)))
            x = self.transformer_ffn_layers[i](x)
        return self.decoder_norm(x[0]) @ self.caping_embed
