"""BLEU-4 (sacrebleu) on values worked out by hand from the definition."""

from __future__ import annotations

import math

import pytest

from xdecoder.training.evaluate import bleu4


def test_bleu4_by_hand() -> None:
    assert bleu4(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)
    # Every n-gram matches but the candidate is short: brevity penalty exp(1 - 6/4).
    assert bleu4(["a b c d"], ["a b c d e f"]) == pytest.approx(math.exp(1 - 6 / 4))
    # Precisions 5/6, 3/5, 1/4, 0/3 -> no 4-gram match, no smoothing: 0.
    assert bleu4(["a b c x d e"], ["a b c d e f"]) == 0.0
    # Corpus level: n-gram counts and lengths are summed before the geometric mean.
    # candidate 2 "a b c d x" vs "a b c d y": 4/5, 3/4, 2/3, 1/2 ; candidate 1 exact (5 tokens): 5/5 ... 2/2
    p = [(5 + 4) / 10, (4 + 3) / 8, (3 + 2) / 6, (2 + 1) / 4]
    expected = math.exp(sum(math.log(x) for x in p) / 4)
    assert bleu4(["a b c d e", "a b c d x"], ["a b c d e", "a b c d y"]) == pytest.approx(expected)
