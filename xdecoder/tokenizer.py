"""The CLIP BPE tokenizer, offline, id-for-id equal to the official one (SPEC §1.5, Appendix B).

The official code loads ``CLIPTokenizer.from_pretrained('openai/clip-vit-base-patch32')`` from the
hub. Its vocabulary is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence, shipped here as
package data, as open_clip ships it); vocab and merges are rebuilt from it in memory the way the
hub files were built. ftfy cleaning runs first, as the official (slow) tokenizer does.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

import ftfy
import torch
from torch import Tensor

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>, also padding
CONTEXT_LENGTH = 77
_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=1)
def _hf_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import CLIPTokenizer

    raw = resources.files("xdecoder.data").joinpath(_VOCAB_FILE).read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1:_NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)},
                         merges=pairs)  # type: ignore[arg-type]  # the BPE backend wants pairs


class ClipTokenizer:
    """Texts -> (input_ids, attention_mask), each [N, 77] int64; padding with end-of-text."""

    def __init__(self, context_length: int = CONTEXT_LENGTH) -> None:
        self.context_length = context_length
        self._tok = _hf_tokenizer()

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self._tok([ftfy.fix_text(t) for t in texts], padding="max_length", truncation=True,
                        max_length=self.context_length)
        return (torch.tensor(enc["input_ids"], dtype=torch.int64),
                torch.tensor(enc["attention_mask"], dtype=torch.int64))

    def decode_caption(self, ids: list[int]) -> str:
        """Official caption decoding: text before the first end-of-text, start tokens removed.

        The official code decodes with transformers 4.34, whose default clean-up joins some
        punctuation to the word before it; newer versions skip it for BPE tokenizers, so it is
        applied here by the same rule, whatever transformers is installed.
        """
        text = clean_up_tokenization(self._tok.decode(ids, skip_special_tokens=False,
                                                      clean_up_tokenization_spaces=False))
        return text.split("<|endoftext|>")[0].replace("<|startoftext|>", "").strip()


_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    """transformers 4.34's ``clean_up_tokenization``: the same replacements, in the same order."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text
