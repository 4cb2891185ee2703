"""Which of a control's labels a phrase means: one vocabulary per control, matched by meaning.

A control's vocabulary is its labels, each with the prompts X-Decoder sees for it (``predicted_values``,
else the value), compared case-insensitively and with blanks collapsed ("Circle" and "circle" are one
prompt). A phrase is matched in this order, and the first rule that decides wins:

1. ``label: phrase`` typed by the annotator, when ``label`` is one of the control's labels;
2. the mapping setting (phrase -> label value), for teams that fix their own words;
3. the phrase equal to a label's prompt or value;
4. the label whose prompt or value appears in the phrase as whole words, plural too ("the big
   cars" -> Car); when several do, the one named first (a referring phrase names its object
   first), at one place the longest; a tie is left to rule 5;
5. meaning: cosine similarity of the model's own text embeddings (the phrase against each label's
   prompts, a label scoring its best); the best label wins only by ``margin`` over the next one,
   else the phrase is ambiguous and gets no label (the caller says so rather than guess).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from xdecoder.predictor import Predictor

# Texts -> [N, D] unit rows in one embedding space (the model's text encoder).
TextEncoder = Callable[[Sequence[str]], np.ndarray]

# Cosine. The bundled model's templated embeddings of unrelated words sit within ~0.02 of each
# other (a small text vocabulary), so a smaller margin would let it guess.
DEFAULT_MARGIN = 0.02


def fold(text: str) -> str:
    """The comparison key of a label or prompt: case-folded, blanks collapsed."""
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class Vocabulary:
    """One control's labels (config order) and their prompts."""

    labels: tuple[str, ...]
    prompts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # label value -> prompt texts

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for label in self.labels:
            for text in (label, *self.prompts.get(label, ())):
                owner = seen.setdefault(fold(text), label)
                if owner != label:
                    raise ValueError(f"{text!r} names two labels of one control: {owner!r} and {label!r} "
                                     "(labels and prompts are compared case-insensitively)")

    def texts(self, label: str) -> tuple[str, ...]:
        """The label's prompts, then its value when that differs: what it is matched against."""
        own = self.prompts.get(label) or (label,)
        return tuple(dict.fromkeys([*own, label]))

    def exact(self, phrase: str) -> str | None:
        key = fold(phrase)
        return next((label for label in self.labels if key in {fold(t) for t in self.texts(label)}), None)


@dataclass(frozen=True)
class PhraseMatch:
    """``label`` is None when no rule decided (``how`` says why); ``phrase`` is what to ground."""

    label: str | None
    phrase: str
    how: str  # explicit | mapping | exact | words | meaning | ambiguous | empty
    similarity: float = 1.0
    closest: str | None = None  # for meaning and ambiguous: the most similar label, and the next
    runner_up: str | None = None
    runner_up_similarity: float | None = None


def split_explicit(text: str, vocabulary: Vocabulary) -> tuple[str | None, str]:
    """``"Water: the lake"`` -> ("Water", "the lake") when Water is a label; else (None, text)."""
    head, sep, rest = text.partition(":")
    if sep and rest.strip():
        label = next((v for v in vocabulary.labels if fold(v) == fold(head)), None)
        if label is not None:
            return label, rest.strip()
    return None, text.strip()


def _words(text: str) -> str:
    return " ".join(re.findall(r"[\w-]+", fold(text)))


def _words_match(phrase: str, vocabulary: Vocabulary) -> str | None:
    """The label named first in the phrase ("the circle left of the square": the circle is the
    object, the square where it is); at one place the longer name wins; a true tie decides nothing."""
    padded = f" {_words(phrase)} "
    hits: dict[tuple[int, int], set[str]] = {}  # (position, -length) -> labels
    for label in vocabulary.labels:
        for text in vocabulary.texts(label):
            words = _words(text)
            if not words:
                continue
            places = [padded.find(f" {form} ") for form in (words, words + "s", words + "es")]
            found = [p for p in places if p >= 0]
            if found:
                hits.setdefault((min(found), -len(words)), set()).add(label)
    if not hits:
        return None
    first = hits[min(hits)]
    return next(iter(first)) if len(first) == 1 else None


def similarities(phrase: str, vocabulary: Vocabulary, encoder: TextEncoder) -> dict[str, float]:
    """Each label's best cosine similarity between the phrase and its prompts (the names the
    model was asked to recognise; a value that is not one of them may be a word it never learnt)."""
    texts = [t for label in vocabulary.labels for t in vocabulary.prompts.get(label) or (label,)]
    rows = np.asarray(encoder([phrase, *texts]), dtype=np.float64)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    cosine = rows[1:] @ rows[0]
    out: dict[str, float] = {}
    k = 0
    for label in vocabulary.labels:
        n = len(vocabulary.prompts.get(label) or (label,))
        out[label] = float(cosine[k:k + n].max())
        k += n
    return out


def match_phrase(phrase: str, vocabulary: Vocabulary, encoder: TextEncoder | None = None, *,
                 mapping: Mapping[str, str] | None = None, margin: float = DEFAULT_MARGIN) -> PhraseMatch:
    """The control's label for a typed phrase (rules in the module docstring). Without ``encoder``
    rule 5 is skipped: a phrase no other rule decides is ``ambiguous``."""
    label, text = split_explicit(phrase, vocabulary)
    if not text:
        return PhraseMatch(None, text, "empty", 0.0)
    if label is not None:
        return PhraseMatch(label, text, "explicit")
    mapped = {fold(k): v for k, v in (mapping or {}).items()}.get(fold(text))
    if mapped is not None:
        found = next((v for v in vocabulary.labels if fold(v) == fold(mapped)), None)
        if found is not None:
            return PhraseMatch(found, text, "mapping")
    exact = vocabulary.exact(text)
    if exact is not None:
        return PhraseMatch(exact, text, "exact")
    words = _words_match(text, vocabulary)
    if words is not None:
        return PhraseMatch(words, text, "words")
    if encoder is None or not vocabulary.labels:
        return PhraseMatch(None, text, "ambiguous", 0.0)
    scores = similarities(text, vocabulary, encoder)
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    best, best_score = ranked[0]
    second, second_score = ranked[1] if len(ranked) > 1 else (None, None)
    if second_score is None or best_score - second_score >= margin:
        return PhraseMatch(best, text, "meaning", best_score, best, second, second_score)
    return PhraseMatch(None, text, "ambiguous", best_score, best, second, second_score)


def model_text_encoder(predictor: Predictor) -> TextEncoder:
    """The predictor's own class-name embeddings (each text averaged over the prompt templates, as
    it classifies regions), so "matches by meaning" means what the model itself tells apart."""
    def encode(texts: Sequence[str]) -> np.ndarray:
        embeddings = predictor.class_embeddings(list(texts))
        return np.asarray(embeddings[:-1].cpu().numpy(), dtype=np.float32)  # last row: "background"

    return encode
