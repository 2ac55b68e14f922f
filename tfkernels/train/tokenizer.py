"""Byte-level BPE tokenizer (GPT-2 style) trained with the `tokenizers` library.

One tokenizer serves both models: the special tokens come first (ids 0..5), so "is special" is
`id < N_SPECIAL` and random MLM replacements are drawn from [N_SPECIAL, vocab).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIALS = ["<|endoftext|>", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
EOS, PAD, CLS, SEP, MASK, UNK = range(len(SPECIALS))
N_SPECIAL = len(SPECIALS)
MIN_VOCAB = 256 + N_SPECIAL  # the 256 byte symbols plus the specials


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path | None = None):
    """Train a byte-level BPE on `texts` with at most vocab_size entries; save to `path` if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE; need >= {MIN_VOCAB}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if path is not None:
        tok.save(str(path))
    return tok


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(str(path))
