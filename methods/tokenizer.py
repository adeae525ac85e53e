"""A word-level tokenizer built from the data's own text: no vocabulary file, nothing downloaded.

Text is lower-cased and split into runs of letters and digits (punctuation and spaces
separate words). Ids 0-3 are the special tokens ``<pad> <bos> <eos> <unk>``; the words
follow in sorted order, so the same data always gives the same ids and a checkpoint's
embedding rows line up when the vocabulary is rebuilt on reload.

    tokenizer = Tokenizer.from_texts(["a red circle", "a blue square"])
    ids, padding = tokenizer.encode(["a red square"], context_length=8)
    ids        # tensor([[1, 4, 7, 8, 2, 0, 0, 0]]): <bos> a red square <eos> <pad> ...
    padding    # True at the <pad> positions
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIALS))

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """Lower-case runs of letters and digits: ``"A photo of a T-shirt."`` -> ``['a', 'photo', 'of', 'a', 't',
    'shirt']``."""
    return _WORD.findall(text.lower())


class Tokenizer:
    """Maps text to ids over a fixed word list (see the module docstring); unknown words become ``<unk>``."""

    def __init__(self, vocabulary: Iterable[str]) -> None:
        self.words: tuple[str, ...] = tuple(sorted(set(vocabulary) - set(SPECIALS)))
        self.ids: dict[str, int] = {w: i for i, w in enumerate(SPECIALS + self.words)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Tokenizer:
        """The vocabulary of ``texts``."""
        return cls(w for text in set(texts) for w in words(text))

    def __len__(self) -> int:
        """Vocabulary size, special tokens included (the rows of an embedding table)."""
        return len(self.ids)

    def encode(self, texts: Sequence[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``<bos> words <eos>`` then ``<pad>`` up to ``context_length``.

        Returns ids int64 ``(B, context_length)`` and the padding mask bool ``(B, context_length)``
        (True at ``<pad>``). A text with more than ``context_length - 2`` words keeps its first
        ones (and its ``<eos>``); how many texts were cut is logged once per call, as a warning.
        """
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3 (<bos>, a word, <eos>), got {context_length}")
        ids = torch.full((len(texts), context_length), PAD_ID, dtype=torch.int64)
        room, truncated = context_length - 2, 0
        for row, text in enumerate(texts):
            tokens = [self.ids.get(w, UNK_ID) for w in words(text)]
            if len(tokens) > room:
                tokens, truncated = tokens[:room], truncated + 1
            ids[row, : len(tokens) + 2] = torch.tensor([BOS_ID, *tokens, EOS_ID])
        if truncated:
            log.warning(
                "%d of %d captions are longer than the text context of %d tokens and were truncated",
                truncated,
                len(texts),
                context_length,
            )
        return ids, ids == PAD_ID

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids ``(B, L)`` -> the words between ``<bos>`` and ``<eos>`` (``<unk>`` kept), space-joined."""
        vocabulary = SPECIALS + self.words
        return [" ".join(vocabulary[i] for i in row if i not in (PAD_ID, BOS_ID, EOS_ID)) for row in ids.tolist()]


def word_counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Word counts float32 ``(B, vocab_size)`` of token ids ``(B, L)``, without ``<pad> <bos> <eos>`` (the text
    baseline's embedding), on the CPU."""
    counts = torch.zeros(ids.shape[0], vocab_size).scatter_add_(
        1, ids.cpu(), torch.ones(ids.shape, dtype=torch.float32)
    )
    counts[:, [PAD_ID, BOS_ID, EOS_ID]] = 0
    return counts


def bag_of_words(ids: torch.Tensor, vocab_size: int) -> np.ndarray:
    """:func:`word_counts` as a numpy array."""
    return word_counts(ids, vocab_size).numpy()
