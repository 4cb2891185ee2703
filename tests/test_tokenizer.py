"""The offline tokenizer gives the official ids (tokenizer_golden.json: 241 cases, SPEC Appendix B)."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.conftest import PARITY
from xdecoder.tokenizer import BOS_ID, EOS_ID, ClipTokenizer

CASES = json.loads((PARITY / "tokenizer_golden.json").read_text())["cases"]


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def test_every_golden_case_matches(tokenizer: ClipTokenizer) -> None:
    ids, mask = tokenizer([c["text"] for c in CASES])
    mismatched = [c["text"] for c, row in zip(CASES, ids.tolist(), strict=True) if row != c["input_ids"]]
    assert not mismatched, f"{len(mismatched)} of {len(CASES)} differ, e.g. {mismatched[:3]}"
    assert mask.sum(1).tolist() == [c["attention_mask_sum"] for c in CASES]


def test_spec_appendix_b_vectors(tokenizer: ClipTokenizer) -> None:
    ids, mask = tokenizer(["a photo of a dog.", "The larger watermelon."])
    assert ids.shape == (2, 77)
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407]
    assert ids[1, :6].tolist() == [49406, 518, 12567, 19889, 269, 49407]
    assert (ids[0, 8:] == EOS_ID).all() and int(mask[0].sum()) == 8
    assert int(ids[0].argmax()) == 7  # the pooling index is the first end-of-text


def test_vocabulary_is_the_official_one() -> None:
    """The shipped BPE file rebuilds the hub's vocab.json/merges.txt byte for byte."""
    from xdecoder.tokenizer import _backend

    expected = json.loads((PARITY / "tokenizer_golden.json").read_text())["tokenizer"]["file_sha256"]
    tok = _backend()
    vocab = dict(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
    assert len(vocab) == 49408
    vocab_json = json.dumps(vocab, ensure_ascii=False)
    assert hashlib.sha256(vocab_json.encode()).hexdigest() == expected["vocab.json"]


def test_long_text_is_truncated_with_end_token(tokenizer: ClipTokenizer) -> None:
    ids, mask = tokenizer(["word " * 200])
    assert ids.shape == (1, 77) and int(mask.sum()) == 77
    assert ids[0, 0] == BOS_ID and ids[0, -1] == EOS_ID


def test_caption_decoding_stops_at_end_token(tokenizer: ClipTokenizer) -> None:
    ids, _ = tokenizer(["a red car. on a road"])
    # The official decode (transformers 4.34) cleans up the space BPE leaves before the period.
    assert tokenizer.decode_caption(ids[0].tolist()) == "a red car. on a road"
