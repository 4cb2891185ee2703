"""Training X-Decoder: one step computes every objective from one backbone pass per batch.

Deterministic for a seed (data order is a function of the step, so a resumed run sees the
same batches); AdamW with warm-up and cosine decay, gradient clipping, optional frozen backbone
and/or text encoder, bf16 autocast on CUDA. Checkpoints are safetensors (official key names)
plus ``state.pt`` (optimizer, schedule, step) and ``meta.json``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from xdecoder.checkpoint import load_state_dict, official_state_dict
from xdecoder.modeling.xdecoder import XDecoder
from xdecoder.prompts import TEMPLATES
from xdecoder.tokenizer import ClipTokenizer
from xdecoder.training.losses import (
    LossWeights,
    caption_loss,
    grounding_loss,
    name_separation_loss,
    retrieval_loss,
    segmentation_loss,
)
from xdecoder.training.synthetic import CLASSES, Scene, make_scene, near_misses


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup: int = 50
    clip: float = 1.0
    seed: int = 0
    num_points: int = 1024
    max_phrases: int = 5  # per image, as the official GROUNDING.MAX_LEN
    freeze_backbone: bool = False
    freeze_text: bool = False
    checkpoint_every: int = 100
    near_misses: int = 0  # extra negative captions per image for the retrieval loss (synthetic scenes only)
    # Synthetic: each step's width drawn from [min_width, width] (0: fixed) and, with this chance, the
    # scene turned portrait, so that inputs padded to a multiple of 32 (photos of any aspect) are seen.
    min_width: int = 0
    portrait: float = 0.0
    weights: LossWeights = field(default_factory=LossWeights)


Batch = list[Scene]


def synthetic_batches(cfg: TrainConfig, size: tuple[int, int] = (160, 128)) -> Callable[[int], Batch]:
    """Batch of step s: scenes seeded by (cfg.seed, s, i), so any step can be replayed."""
    base = cfg.seed * 10_000_019

    def batch(step: int) -> Batch:
        rng = random.Random(base + step)
        width, height = (rng.randint(cfg.min_width, size[0]), size[1]) if cfg.min_width else size
        shape = (height, width) if rng.random() < cfg.portrait else (width, height)
        return [make_scene(base + step * cfg.batch_size + i, shape) for i in range(cfg.batch_size)]

    return batch


def random_prompts(names: Sequence[str], rng: random.Random) -> list[str]:
    """Each name in one template drawn at random, as official training phrases class names."""
    return [TEMPLATES[rng.randrange(len(TEMPLATES))].format(n) for n in names]


def _pad_to(x: Tensor, multiple: int = 32) -> Tensor:
    return F.pad(x, (0, -x.shape[-1] % multiple, 0, -x.shape[-2] % multiple))


class Trainer:
    def __init__(self, model: XDecoder, cfg: TrainConfig, class_names: Sequence[str] = CLASSES) -> None:
        self.model, self.cfg, self.class_names = model, cfg, list(class_names)
        self.tokenizer = ClipTokenizer()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if cfg.freeze_backbone:
            model.backbone.requires_grad_(False)
        if cfg.freeze_text:
            model.language.lang_encoder.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule)
        self.step = 0
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def _schedule(self, step: int) -> float:
        if step < self.cfg.warmup:
            return (step + 1) / self.cfg.warmup
        progress = (step - self.cfg.warmup) / max(1, self.cfg.steps - self.cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _texts(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        ids, attention = self.tokenizer(texts)
        device = next(self.model.parameters()).device
        tokens, sentences = self.model.language(ids.to(device))
        return tokens, sentences, attention.to(device)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        model, cfg = self.model, self.cfg
        device = next(model.parameters()).device
        pixels = _pad_to(model.normalize(torch.stack([torch.from_numpy(s.image).permute(2, 0, 1)
                                                      for s in batch]).to(device)))
        h, w = pixels.shape[-2:]
        feats = model.backbone(pixels)
        pix = model.sem_seg_head.pixel_decoder(feats)
        # One random template per class and step, as official training does.
        rng = random.Random(self.step)
        vocabulary = [*self.class_names, "background"]
        _, class_emb, _ = self._texts(random_prompts(vocabulary, rng))
        class_emb = F.normalize(class_emb, dim=-1)
        decoder = model.decoder
        head = decoder(pix.multi_scale_features, pix.mask_features, class_emb)
        assert not isinstance(head, list) and head.logits is not None
        totals: dict[str, Tensor] = {}
        if cfg.weights.names:
            others = random_prompts(vocabulary, rng)
            totals["names"] = name_separation_loss(class_emb, self._texts(others)[1], model.language.logit_scale,
                                                   cfg.weights)

        def add(parts: dict[str, Tensor]) -> None:
            for key, value in parts.items():
                totals[key] = totals.get(key, 0) + value / len(batch)  # type: ignore[operator]

        for i, scene in enumerate(batch):
            gt = torch.stack([torch.from_numpy(scene.mask(s.id)) for s in scene.segments]).float().to(device)
            gt = _pad_to(gt)[:, :h, :w]
            labels = torch.tensor([s.category_id for s in scene.segments], device=device)
            add(segmentation_loss(head.logits[i], head.masks[i], labels, gt, cfg.num_points, cfg.weights,
                                  self.generator))
            phrases = list(scene.phrases.items())[: cfg.max_phrases]
            if phrases:
                tokens, sentences, attention = self._texts([p for _, p in phrases])
                grounding_tokens = tokens[attention.bool()][:, None]
                grd = decoder.ground([m[i:i + 1] for m in pix.multi_scale_features], pix.mask_features[i:i + 1],
                                     grounding_tokens)
                phrase_masks = gt[[next(k for k, s in enumerate(scene.segments) if s.id == sid) for sid, _ in phrases]]
                add(grounding_loss(grd.embeddings[0], grd.masks[0], sentences, phrase_masks,
                                   model.language.logit_scale, cfg.num_points, cfg.weights, self.generator))
        ids, _ = self.tokenizer([s.caption for s in batch])
        ids = ids.to(device)
        token_emb, caption_emb = model.language(ids)
        features = decoder.caption_features(decoder.memory(pix.multi_scale_features), pix.mask_features, token_emb)
        logits = features @ model.language.lang_encoder.token_embedding.weight.t()
        totals["caption"] = caption_loss(logits, ids, cfg.weights)
        image_embeddings = [head.embeddings[:, -1], model.backbone_embedding(feats["res5"])]
        negatives = None
        if cfg.near_misses:
            rng = random.Random(self.step)
            wrong = [c for s in batch for c in near_misses(s, cfg.near_misses, rng)]
            wrong = [c for c in dict.fromkeys(wrong) if c not in {s.caption for s in batch}]
            if wrong:
                negatives = model.language(self.tokenizer(wrong)[0].to(device))[1]
        totals["retrieval"] = retrieval_loss(image_embeddings, caption_emb, model.language.logit_scale, cfg.weights,
                                             negatives)
        return totals

    def train_step(self, batch: Batch) -> dict[str, float]:
        self.model.train()
        device = next(self.model.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            parts = self.losses(batch)
        loss = sum(parts.values())
        assert isinstance(loss, Tensor)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.model.eval()
        return {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, folder: Path, meta: dict[str, Any] | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        state = official_state_dict(self.model)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors.tmp"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": self.step, "generator": self.generator.get_state()}, folder / "state.pt.tmp")
        info = {"config": self.model.config.name, "classes": self.class_names, "step": self.step,
                "train": asdict(self.cfg), **(meta or {})}
        (folder / "meta.json.tmp").write_text(json.dumps(info, indent=2, default=str))
        for name in ("model.safetensors", "state.pt", "meta.json"):  # replace all three only once all are written
            (folder / f"{name}.tmp").replace(folder / name)
        return folder

    def resume(self, folder: Path) -> bool:
        """Continue from ``folder`` if it holds a checkpoint; returns whether it did."""
        if not (folder / "state.pt").is_file():
            return False
        load_state_dict(self.model, load_file(str(folder / "model.safetensors")))
        state = torch.load(folder / "state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        return True

    def fit(self, batches: Callable[[int], Batch], folder: Path | None = None,
            log: Callable[[int, dict[str, float]], None] | None = None, until: int | None = None,
            meta: dict[str, Any] | None = None) -> list[dict[str, float]]:
        """Train until ``cfg.steps`` (or step ``until``), resuming from ``folder`` when it has a checkpoint;
        ``meta`` (what the data was, say) goes into every checkpoint's meta.json."""
        if folder is not None:
            self.resume(folder)
        history = []
        while self.step < min(self.cfg.steps, until or self.cfg.steps):
            record = self.train_step(batches(self.step))
            history.append(record)
            if log:
                log(self.step, record)
            if folder is not None and (self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps):
                self.save(folder, meta)
        return history
