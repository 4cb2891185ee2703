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
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
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


# CLIP's pre-tokenizer pattern (the special tokens first, so that they stay whole).
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache(maxsize=1)
def _backend() -> Tokenizer:
    """The pipeline of transformers' ``CLIPTokenizer``, built with the tokenizers library alone."""
    raw = resources.files("xdecoder.data").joinpath(_VOCAB_FILE).read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1:_NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    pairs = [(a, b) for a, b in (m.split() for m in merges)]
    tok = Tokenizer(BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=pairs, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    tok.post_processor = processors.RobertaProcessing(("<|endoftext|>", EOS_ID), ("<|startoftext|>", BOS_ID),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok


class ClipTokenizer:
    """Texts -> (input_ids, attention_mask), each [N, 77] int64; padding with end-of-text."""

    def __init__(self, context_length: int = CONTEXT_LENGTH) -> None:
        self.context_length = context_length
        # A copy: truncation and padding are settings of the Tokenizer object itself.
        self._tok = Tokenizer.from_str(_backend().to_str())
        self._tok.enable_truncation(max_length=context_length)
        self._tok.enable_padding(length=context_length, pad_id=EOS_ID, pad_token="<|endoftext|>")

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self._tok.encode_batch([ftfy.fix_text(t) for t in texts])
        return (torch.tensor([e.ids for e in enc], dtype=torch.int64),
                torch.tensor([e.attention_mask for e in enc], dtype=torch.int64))

    def decode_caption(self, ids: list[int]) -> str:
        """Official caption decoding: text before the first end-of-text, start tokens removed.

        The official code decodes with transformers 4.34, whose default clean-up joins some
        punctuation to the word before it; it is applied here by the same rule.
        """
        text = self._tok.decode(ids, skip_special_tokens=False).replace("</w>", " ").strip()
        text = clean_up_tokenization(text)
        return text.split("<|endoftext|>")[0].replace("<|startoftext|>", "").strip()


_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    """transformers 4.34's ``clean_up_tokenization``: the same replacements, in the same order."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text
