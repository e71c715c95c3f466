"""A word-level tokenizer with a byte fallback: no download, any UTF-8 text, no unknown-word crash.

Captions in this project come from small closed vocabularies (shapes, CIFAR class templates), so a
word vocabulary built from the training captions gives short sequences; any word outside it is spelled
as its UTF-8 bytes, so every string is encodable and `decode(encode(s))` gives back the normalised text.
The vocabulary is part of the model: `state_dict()` is saved inside every checkpoint that reads text.

Token ids: 0 = PAD, 1 = BOS, 2 = EOS, 3..258 = the 256 byte values, 259.. = words (a word token
implies a following space; bytes run together). A sequence is [BOS, tokens..., EOS, PAD, ...].
"""
from __future__ import annotations

import re
import unicodedata
import warnings
from collections import Counter
from typing import Iterable, Sequence

import torch

_SPLIT = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_BYTE_OFFSET = 3
_NUM_SPECIAL = 3 + 256


def normalize(text: str) -> str:
    """NFC, lower case, single spaces: the form in which text is tokenized."""
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


class Tokenizer:
    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, words: Sequence[str], context_length: int = 32):
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (BOS, one token, EOS), got {context_length}")
        self.words = list(words)
        self.context_length = int(context_length)
        self._ids = {w: _NUM_SPECIAL + i for i, w in enumerate(self.words)}
        if len(self._ids) != len(self.words):
            raise ValueError("tokenizer vocabulary has duplicate words")

    @classmethod
    def build(cls, texts: Iterable[str], context_length: int = 32, max_words: int = 20000,
              min_count: int = 1) -> "Tokenizer":
        """A vocabulary of the `max_words` most frequent words (ties broken alphabetically, so the
        result does not depend on the order of `texts`)."""
        counts = Counter(w for text in texts for w in _SPLIT.findall(normalize(text)))
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(ranked[:max_words], context_length)

    @property
    def vocab_size(self) -> int:
        return _NUM_SPECIAL + len(self.words)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS/padding and without truncation."""
        ids: list[int] = []
        for word in _SPLIT.findall(normalize(text)):
            token = self._ids.get(word)
            if token is not None:
                ids.append(token)
            else:  # byte fallback: unseen words never fail
                ids.extend(_BYTE_OFFSET + b for b in (word + " ").encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if _BYTE_OFFSET <= i < _NUM_SPECIAL:
                out.append(i - _BYTE_OFFSET)
            elif i >= _NUM_SPECIAL:
                out.extend((self.words[i - _NUM_SPECIAL] + " ").encode("utf-8"))
        return out.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """texts -> LongTensor (N, context_length): [BOS, ..., EOS, PAD...]. Too-long texts are truncated
        with a warning (EOS is kept as the last token, so pooling at EOS still works)."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > length - 2:
                warnings.warn(f"caption truncated to {length} tokens: {text[:60]!r}...", stacklevel=2)
                ids = ids[: length - 2]
            out[row, : len(ids) + 2] = torch.tensor([self.BOS, *ids, self.EOS])
        return out

    def state_dict(self) -> dict:
        """Plain types only, so a checkpoint holding it loads with weights_only=True."""
        return {"kind": "word+byte", "version": 1, "words": list(self.words), "context_length": self.context_length}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Tokenizer":
        if not isinstance(state, dict) or state.get("kind") != "word+byte":
            raise ValueError("not a tokenizer state (expected kind 'word+byte')")
        return cls(state["words"], state["context_length"])

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        return f"Tokenizer(words={len(self.words)}, context_length={self.context_length})"
