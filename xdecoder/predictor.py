"""Task API over one image pass: ``encode`` once, then ask for any task from the cached features.

The segmentation pass of X-Decoder is class-agnostic up to the last dot product: class logits
are cos(query embedding, class-name embedding). ``encode`` therefore runs backbone, pixel
decoder and decoder once and keeps the query embeddings and mask logits; semantic, instance and
panoptic results for any class list, the retrieval embedding and region embeddings come from
that cache. Grounding and captioning add their own decoder passes over the cached pixel-decoder
features; the backbone never runs twice.

Images in a batch are grouped by padded size: the official model lets padding take part in
attention, so only equal-size images can share a forward and still give one-at-a-time results.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from xdecoder.masks import MaskStack
from xdecoder.modeling.decoder import Memory
from xdecoder.modeling.xdecoder import SIZE_DIVISIBILITY, XDecoder
from xdecoder.postprocess import (
    MaskUpsampler,
    binary_masks,
    instances,
    masks_to_boxes,
    nearest_resize,
    panoptic_segments,
    semantic_labels,
    semantic_scores,
    uncertainty,
)
from xdecoder.preprocess import PredictorSettings, compute_dtype, prepare, preprocessing, size_groups
from xdecoder.prompts import class_prompts
from xdecoder.results import GroundingResult, InstanceResult, PanopticResult, Region, Segment, SemanticResult
from xdecoder.tokenizer import BOS_ID, EOS_ID, ClipTokenizer
from xdecoder.transforms import ImageGeometry, ImageInput, pad_batch

BACKGROUND = "background"  # the no-object class, embedded like any other name (SPEC §5)


@dataclass
class EncodedImage:
    """The cached result of one image's pass (tensors keep a batch dim of 1)."""

    geometry: ImageGeometry
    padded: tuple[int, int]
    mask_features: Tensor
    multi_scale: list[Tensor]
    res5: Tensor
    embeddings: Tensor  # [Q, D] query embeddings of the last head (class query pooled)
    mask_logits: Tensor  # [Q, H/4, W/4]
    latents: list[Tensor]  # per decoder layer [Q, 1, D]: what caption tokens attend to

    def upsampler(self, mask_logits: Tensor | None = None) -> MaskUpsampler:
        logits = self.mask_logits if mask_logits is None else mask_logits
        return MaskUpsampler(logits, self.padded, self.geometry.resized, self.geometry.original)


@dataclass
class Features:
    images: list[EncodedImage]

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[EncodedImage]:
        return iter(self.images)


def _box(row: Tensor) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in row)
    return (x0, y0, x1, y1)


class Predictor:
    """X-Decoder tasks over PIL images or arrays, with outputs in original image coordinates."""

    def __init__(self, model: XDecoder, device: str | torch.device | None = None,
                 settings: PredictorSettings | None = None, autocast: bool | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # Channels-last convolutions: backbone + pixel decoder 1.29 s -> 1.11 s (Focal-T, 512x704, 2 CPU cores).
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
        self.settings = settings or PredictorSettings()
        self.tokenizer = ClipTokenizer(model.config.text.context_length)
        # fp16/bf16 autocast on CUDA only; CPU stays float32 for exactness.
        self.autocast = (self.device.type == "cuda") if autocast is None else autocast
        self._autocast_dtype = autocast_dtype  # None: bf16 where supported, else fp16
        # The model version the weights belong to (set by whoever loads them): class-name embeddings
        # are cached per (version, name), so weights loaded into this model later never meet stale ones.
        self.version = ""
        # Bounded, least recently used dropped first.
        self._class_embeddings: OrderedDict[tuple[str, str], Tensor] = OrderedDict()

    # -- running the network -----------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        if not self.autocast:
            return torch.float32
        if self._autocast_dtype is not None:
            return self._autocast_dtype
        return torch.bfloat16 if self.device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16

    def preprocessing(self) -> dict[str, object]:
        return preprocessing(self.settings, self.dtype)

    def _context(self) -> contextlib.AbstractContextManager[object]:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
        return stack

    def encode(self, images: ImageInput | Sequence[ImageInput], *, pad_together: bool = False
               ) -> Features:
        """One backbone + pixel decoder + decoder pass per image, batched by padded size.

        ``pad_together`` pads the whole batch to its largest image in one forward, as the
        official evaluators do; results then depend on the batch's composition.
        """
        if not isinstance(images, Sequence) or isinstance(images, np.ndarray):
            images = [images]
        prepared = prepare(images, self.settings)
        encoded: list[EncodedImage | None] = [None] * len(prepared)
        with self._context():
            for members in size_groups([geometry for geometry, _ in prepared], pad_together):
                pixels = pad_batch([self.model.normalize(
                    torch.from_numpy(prepared[i][1]).permute(2, 0, 1).to(self.device))
                    for i in members], SIZE_DIVISIBILITY).contiguous(memory_format=torch.channels_last)
                padded = (pixels.shape[-2], pixels.shape[-1])
                out = self.model.encode(pixels)
                for j, i in enumerate(members):
                    encoded[i] = EncodedImage(
                        prepared[i][0], padded, out.mask_features[j:j + 1].float(),
                        [m[j:j + 1].float() for m in out.multi_scale], out.res5[j:j + 1].float(),
                        out.head.embeddings[j].float(), out.head.masks[j].float(),
                        [latent[:, j:j + 1].float() for latent in out.head.latents or []])
        return Features([e for e in encoded if e is not None])

    # -- text --------------------------------------------------------------------------------

    def _sentence_embeddings(self, texts: list[str]) -> Tensor:
        ids, _ = self.tokenizer(texts)
        with self._context():
            _, sentence = self.model.language.encode_trimmed(ids.to(self.device))
        return sentence.float()

    def class_embeddings(self, class_names: Sequence[str]) -> Tensor:
        """[K+1, D]: each name averaged over the 81 templates, plus "background" (cached per name)."""
        names = list(class_names) + [BACKGROUND]
        cache = self._class_embeddings
        found: dict[str, Tensor] = {}
        for name in dict.fromkeys(names):
            key = (self.version, name)
            if key in cache:
                cache.move_to_end(key)
                found[name] = cache[key]
                continue
            e = self._sentence_embeddings(class_prompts(name))
            e = (e / (e.norm(dim=-1, keepdim=True) + 1e-7)).mean(0)
            found[name] = cache[key] = e / e.norm()
        while len(cache) > max(self.settings.class_cache_size, 0):
            cache.popitem(last=False)
        return torch.stack([found[n] for n in names])

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] unit sentence embeddings (no templates) in the joint image-text space."""
        e = self._sentence_embeddings(list(texts))
        return (e / (e.norm(dim=-1, keepdim=True) + 1e-7)).cpu().numpy()

    def text_query_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """[N, 2D] queries for ``image_embeddings``: their dot product is the retrieval score
        w*cos(decoder, text) + (1-w)*cos(backbone, text), w = ``retrieval_decoder_weight`` (0.5: official)."""
        w = self.settings.retrieval_decoder_weight
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"retrieval_decoder_weight must be in [0, 1], got {w}")
        t = self.text_embeddings(texts)
        return np.concatenate([2 * w * t, 2 * (1 - w) * t], axis=1) / math.sqrt(2.0)

    # -- segmentation ------------------------------------------------------------------------

    def _logits(self, image: EncodedImage, class_names: Sequence[str]) -> Tensor:
        if not class_names:
            raise ValueError("class_names is empty")
        # float32 even under autocast: the post-processing thresholds and returns these scores.
        return self.model.decoder.class_logits(image.embeddings, self.class_embeddings(class_names)).float()

    def semantic(self, features: Features, class_names: Sequence[str], *,
                 return_scores: bool = False) -> list[SemanticResult]:
        results = []
        with self._context():
            for image in features:
                logits = self._logits(image, class_names)
                scores = semantic_scores(logits, image.upsampler()) if return_scores else None
                best, label = scores.max(0) if scores is not None else semantic_labels(logits, image.upsampler())
                results.append(SemanticResult(
                    label.to(torch.int32).cpu().numpy(), best.cpu().numpy(), list(class_names),
                    scores.cpu().numpy() if scores is not None else None))
        return results

    def _thresholds(self) -> tuple[float, float]:
        cfg, s = self.model.config, self.settings
        return (cfg.object_mask_threshold if s.object_mask_threshold is None else s.object_mask_threshold,
                cfg.overlap_threshold if s.overlap_threshold is None else s.overlap_threshold)

    def panoptic(self, features: Features, class_names: Sequence[str],
                 stuff: Collection[str] = ()) -> list[PanopticResult]:
        """Names in ``stuff`` are amorphous classes (one merged segment each); the rest are things."""
        stuff_ids = {i for i, n in enumerate(class_names) if n in stuff}
        object_thr, overlap_thr = self._thresholds()
        results = []
        with self._context():
            for image in features:
                seg_map, infos = panoptic_segments(
                    self._logits(image, class_names), image.upsampler(), stuff_ids,
                    object_mask_threshold=object_thr, overlap_threshold=overlap_thr)
                segments = []
                for info in infos:  # one full-size mask at a time
                    mask = seg_map == info.id
                    segments.append(Segment(info.id, info.category_id, class_names[info.category_id],
                                            info.isthing, info.score, int(mask.sum()),
                                            _box(masks_to_boxes(mask[None])[0]), info.query))
                results.append(PanopticResult(seg_map.cpu().numpy(), segments))
        return results

    def instance(self, features: Features, class_names: Sequence[str],
                 stuff: Collection[str] = ()) -> list[InstanceResult]:
        """Top-100 (query, class) pairs, stuff classes dropped, best first."""
        stuff_ids = {i for i, n in enumerate(class_names) if n in stuff}
        results = []
        with self._context():
            for image in features:
                out = instances(self._logits(image, class_names), image.upsampler(), stuff_ids,
                                detections=self.model.config.detections_per_image)
                masks = out["masks"]
                assert isinstance(masks, MaskStack)
                classes = [int(c) for c in out["classes"]]
                results.append(InstanceResult(
                    masks, masks.boxes(), np.asarray(out["scores"]), np.asarray(out["classes"]),
                    [class_names[c] for c in classes], np.asarray(out["queries"])))
        return results

    def uncertainty(self, features: Features, class_names: Sequence[str]) -> np.ndarray:
        """[B] per-image uncertainty in [0, 1] for these class names (see ``postprocess.uncertainty``)."""
        with self._context():
            return np.array([uncertainty(self._logits(image, class_names),
                                         image.mask_logits[:, : -(-image.geometry.resized[0] // 4),
                                                           : -(-image.geometry.resized[1] // 4)])
                             for image in features], dtype=np.float32)

    # -- referring segmentation ------------------------------------------------------------

    def ground(self, features: Features, phrases: Sequence[str]) -> list[list[GroundingResult]]:
        """One mask per phrase per image. All phrases of an image go through one decoder pass,
        their tokens concatenated, as the official evaluator feeds them."""
        if not phrases:
            raise ValueError("phrases is empty")
        ids, attention = self.tokenizer(list(phrases))
        decoder, language = self.model.decoder, self.model.language
        results = []
        with self._context():
            token_emb, sentence = language.encode_trimmed(ids.to(self.device))
            valid = attention[:, : token_emb.shape[1]].bool().to(self.device)
            tokens = token_emb[valid][:, None]  # [T, 1, D]: every phrase's tokens, start to end
            t = sentence / (sentence.norm(dim=-1, keepdim=True) + 1e-7)
            scale = language.logit_scale.exp().clamp(max=100)
            for image in features:
                head = decoder.ground(image.multi_scale, image.mask_features, tokens)
                v = head.embeddings[0].float()
                sim = scale * (v / (v.norm(dim=-1, keepdim=True) + 1e-7)) @ t.float().t()  # [Q-1, P]
                best_scores, best = sim.max(0)
                found = []
                for start, logits in image.upsampler(head.masks[0].float()).chunks(best):
                    for j in range(logits.shape[0]):
                        k = start + j
                        found.append(GroundingResult(phrases[k], (logits[j] > 0).cpu().numpy(),
                                                     logits[j].cpu().clone().numpy(), float(best_scores[k]),
                                                     int(best[k])))
                    del logits  # before the next chunk is made: one chunk of full-size floats at a time
                results.append(found)
        return results

    # -- captioning ----------------------------------------------------------------------------

    def caption(self, features: Features, masks: Sequence[np.ndarray | None] | None = None
                ) -> list[str]:
        """Greedy captions; with ``masks`` (one bool [H, W] per image, or None), the caption
        tokens see only memory inside the region (referring captioning)."""
        return [self._tokens_to_text(ids) for ids in self.caption_ids(features, masks)]

    def caption_ids(self, features: Features, masks: Sequence[np.ndarray | None] | None = None
                    ) -> list[list[int]]:
        steps = self.settings.caption_steps or self.model.config.decoder.captioning_steps
        if masks is not None and len(masks) != len(features):
            raise ValueError(f"got {len(masks)} masks for {len(features)} images")
        # Images of one padded size caption together: each step's weights are read once per group.
        groups: dict[tuple[int, int], list[int]] = {}
        for k, image in enumerate(features):
            groups.setdefault(image.padded, []).append(k)
        out: list[list[int]] = [[] for _ in range(len(features))]
        with self._context():
            for members in groups.values():
                regions = [masks[k] if masks is not None else None for k in members]
                rows = self._greedy_captions([features.images[k] for k in members], steps, regions)
                for k, row in zip(members, rows, strict=True):
                    out[k] = row
        return out

    def _region_block(self, image: EncodedImage, mask: np.ndarray | None, sizes: list[tuple[int, int]]
                      ) -> list[Tensor]:
        """Per memory level, [h*w] True where caption tokens may not look (outside the region)."""
        if mask is None:
            return [torch.zeros(h * w, dtype=torch.bool, device=self.device) for h, w in sizes]
        if mask.shape != image.geometry.original:
            raise ValueError(f"region mask has shape {mask.shape}, image is {image.geometry.original}")
        region = nearest_resize(torch.from_numpy(mask.astype(bool)), image.geometry.resized)
        canvas = torch.zeros(image.padded, dtype=torch.bool)
        canvas[: region.shape[0], : region.shape[1]] = region
        return [~nearest_resize(canvas, size).flatten().to(self.device) for size in sizes]

    def _greedy_captions(self, images: list[EncodedImage], steps: int, regions: list[np.ndarray | None]
                         ) -> list[list[int]]:
        """Official greedy decoding (77-slot buffer of start tokens, argmax at step t written to
        t+1), computed incrementally: text encoder and caption tokens are causal and latent
        queries never see caption tokens, so each position is computed once, against the
        segmentation pass's latent states; the ids are the official ones (up to float order).
        ``images`` share one padded size, so their memories stack into one batch."""
        decoder, language = self.model.decoder, self.model.language
        mems = [decoder.memory(image.multi_scale) for image in images]
        mem = Memory([torch.cat(level, dim=1) for level in zip(*(m.src for m in mems), strict=True)],
                     [torch.cat(level, dim=1) for level in zip(*(m.pos for m in mems), strict=True)],
                     mems[0].sizes)
        latents = [torch.cat(layer, dim=1) for layer in zip(*(image.latents for image in images), strict=True)]
        # Incremental decoding: every computation is causal, so each position is computed once.
        block = None
        if any(r is not None for r in regions):
            per_image = [self._region_block(image, r, mem.sizes) for image, r in zip(images, regions, strict=True)]
            block = [torch.stack(level) for level in zip(*per_image, strict=True)]
        context = decoder.context_length
        ids = torch.full((len(images), context), BOS_ID, dtype=torch.int64, device=self.device)
        finished = torch.zeros(len(images), dtype=torch.bool, device=self.device)
        vocab = language.lang_encoder.token_embedding.weight
        state = decoder.caption_start(mem, latents, block)
        text_cache: list[tuple[Tensor, Tensor]] = []
        for step in range(min(steps, context - 1)):
            token_emb = language.step(ids[:, step], step, text_cache)
            next_ids = (decoder.caption_step(state, token_emb, step) @ vocab.t()).argmax(-1)
            # A finished caption keeps its start-token filler, as a lone run that stopped would.
            ids[:, step + 1] = torch.where(finished, BOS_ID, next_ids)
            finished |= next_ids == EOS_ID
            if bool(finished.all()):  # later tokens cannot change the text before the first EOS
                break
        return ids.tolist()

    def _tokens_to_text(self, ids: list[int]) -> str:
        # evaluate_captioning keeps the text before the first period.
        return self.tokenizer.decode_caption(ids).split(".")[0].strip()

    # -- retrieval -----------------------------------------------------------------------------

    def image_embeddings(self, features: Features) -> np.ndarray:
        """[B, 2D] unit vectors: (decoder embedding, backbone embedding) each normalized, / sqrt 2.

        Their dot product with ``text_query_embeddings`` is the retrieval score (officially
        0.5*cos(decoder, text) + 0.5*cos(backbone, text)); with each other, image similarity.
        """
        rows = []
        with self._context():
            for image in features:
                a = image.embeddings[-1]
                b = self.model.backbone_embedding(image.res5)[0].float()
                rows.append(torch.cat([a / a.norm(), b / b.norm()]) / math.sqrt(2.0))
        return torch.stack(rows).cpu().numpy()

    def region_objectness(self, image: EncodedImage) -> Tensor:
        """[Q] class-agnostic objectness per query: 1 - the no-object probability.

        The official heads classify by softmax over the class names plus "background", which plays
        the no-object class (SPEC §5); instance scores use that class probability (SPEC §4.3). With no
        class list, the names are ``settings.region_vocabulary`` and objectness is 1 - P(background),
        i.e. the summed probability of the vocabulary's classes.
        """
        return 1 - self._logits(image, self.settings.region_vocabulary).softmax(-1)[:, -1]

    def region_scores(self, image: EncodedImage) -> tuple[Tensor, Tensor]:
        """([Q] scores, [Q, h, w] binary masks) at the decoder's 1/4 resolution inside the image.

        score = objectness x mean mask probability inside the binary mask (logit > 0), the official
        instance score (SPEC §4.3) with a class-agnostic class term; an empty mask scores 0. The mask
        term alone is always above 0.5 for a non-empty mask, so it cannot tell weak queries apart.
        """
        low = image.mask_logits[:, : -(-image.geometry.resized[0] // 4), : -(-image.geometry.resized[1] // 4)]
        binary = low > 0
        area = binary.flatten(1).sum(1)
        mask_score = (low.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (area + 1e-6)
        return self.region_objectness(image) * mask_score * (area > 0), binary

    def region_embeddings(self, features: Features) -> list[list[Region]]:
        """Class-agnostic regions with their embeddings: queries scoring at least
        ``settings.region_min_score`` (see ``region_scores``), best first, de-duplicated by mask IoU."""
        s = self.settings
        results = []
        with self._context():
            for image in features:
                q = image.embeddings.shape[0]
                # Choose and de-duplicate at the decoder's 1/4 resolution; upsample only the chosen.
                score, binary = self.region_scores(image)
                order = [int(i) for i in score.argsort(descending=True, stable=True)
                         if score[i] > 0 and score[i] >= s.region_min_score and i < q - 1]  # class query: the image
                chosen: list[int] = []
                for i in order:
                    inter = (binary[chosen] & binary[i]).flatten(1).sum(1).float()
                    union = (binary[chosen] | binary[i]).flatten(1).sum(1).float()
                    if chosen and bool((inter / union > s.region_nms_iou).any()):
                        continue
                    chosen.append(i)
                    if len(chosen) == s.max_regions:
                        break
                idx = torch.tensor(chosen, dtype=torch.int64)
                emb = image.embeddings[idx]
                emb = (emb / (emb.norm(dim=-1, keepdim=True) + 1e-7)).cpu().numpy()
                regions = []
                for k, (packed, _) in enumerate(binary_masks(image.upsampler(), idx)):
                    if packed.area:
                        regions.append(Region(packed, _box(torch.tensor(packed.box)), emb[k],
                                              float(score[chosen[k]]), chosen[k]))
                results.append(regions)
        return results


__all__ = [
    "EncodedImage", "Features", "GroundingResult", "InstanceResult", "PanopticResult",
    "Predictor", "PredictorSettings", "Region", "Segment", "SemanticResult", "compute_dtype", "preprocessing",
]
