"""Text → token ids, shared by training, the phone and the server. TensorFlow-free.

Tokenization (the same everywhere, so a phone turns typed text into exactly the
ids the model was trained on):

* Text is lowercased and split into sentences at `.`, `!`, `?`, `;` and `:`.
* A word is a run of letters/digits, optionally joined by inner apostrophes
  (``o'er``, ``is't``); every other character (other punctuation, leading or
  trailing apostrophes, dashes) separates words and is dropped.
* A sentence becomes ``bos w1 … wn eos``; it is cut into windows of
  ``seq_len + 1`` tokens (the model reads ``seq[:-1]`` and predicts
  ``seq[1:]``), the last window padded with pad.
"""
from __future__ import annotations

import collections
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

PAD, BOS, EOS, OOV = "<pad>", "<bos>", "<eos>", "<oov>"
SPECIAL_TOKENS = (PAD, BOS, EOS, OOV)
PAD_ID, BOS_ID, EOS_ID, OOV_ID = range(4)
# A keyboard never offers these; see contract.model.metrics for the metric definition.
NEVER_SUGGEST = (PAD_ID, BOS_ID, OOV_ID)

FREE_SLOT = "<free:"       # a reserved vocabulary slot: "<free:0>", "<free:1>", ...

_SENTENCE_END = re.compile(r"[.!?;:]+")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def split_sentences(text: str) -> list[list[str]]:
    """Lowercased words of each non-empty sentence of `text`."""
    out = []
    for part in _SENTENCE_END.split(text.lower()):
        words = _WORD.findall(part)
        if words:
            out.append(words)
    return out


def words(text: str) -> list[str]:
    """All words of `text`, sentence boundaries ignored."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Bidirectional token ↔ id map: the 4 special tokens, then words by frequency."""

    def __init__(self, tokens: Sequence[str]):
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary starts with {SPECIAL_TOKENS}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary tokens must be unique")
        self.tokens = list(tokens)
        self._ids = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, texts: Iterable[str], size: int = 10_000, reserved: int = 0) -> "Vocabulary":
        """The specials, the `size - reserved` most frequent words of `texts` (ties: alphabetical),
        then `reserved` free slots for words found later (federated discovery fills them without
        changing the model's shape)."""
        if not 0 <= reserved <= size:
            raise ValueError(f"reserved ({reserved}) must be in [0, size ({size})]")
        counts = collections.Counter()
        for text in texts:
            counts.update(words(text))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls(list(SPECIAL_TOKENS) + [w for w, _ in ranked[:size - reserved]]
                   + [f"{FREE_SLOT}{i}>" for i in range(reserved)])

    @property
    def free_slots(self) -> list[int]:
        """Ids of the slots no word holds yet (tokens "<free:i>": no text ever encodes to them)."""
        return [i for i, t in enumerate(self.tokens) if t.startswith(FREE_SLOT)]

    def with_words(self, new: Sequence[str]) -> "Vocabulary":
        """This vocabulary with `new` words in its first free slots (ids of every other token kept)."""
        bad = [w for w in new if _WORD.fullmatch(w) is None or w in self._ids]
        if bad or len(set(new)) != len(new):
            raise ValueError(f"not new words of the tokenizer's form: {bad[:5] or 'duplicates'}")
        slots = self.free_slots
        if len(new) > len(slots):
            raise ValueError(f"{len(new)} new words, {len(slots)} free slots")
        tokens = list(self.tokens)
        for slot, w in zip(slots, new):
            tokens[slot] = w
        return Vocabulary(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def id(self, word: str) -> int:
        return self._ids.get(word, OOV_ID)

    def encode(self, words_: Iterable[str]) -> list[int]:
        return [self._ids.get(w, OOV_ID) for w in words_]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[int(i)] for i in ids]

    def to_json(self) -> str:
        return json.dumps(self.tokens, ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str) -> "Vocabulary":
        return cls(json.loads(data))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    @property
    def sha256(self) -> str:
        """Identity of the vocabulary: the hash of its JSON form."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


def to_sequences(texts: Iterable[str], vocab: Vocabulary,
                 seq_len: int = 20) -> np.ndarray:
    """Token windows of `texts`: int32 [n, seq_len + 1] (x = [:, :-1], y = [:, 1:])."""
    rows = []
    for text in texts:
        for sentence in split_sentences(text):
            ids = [BOS_ID] + vocab.encode(sentence) + [EOS_ID]
            # Windows overlap by one token so every target is predicted once.
            for start in range(0, len(ids) - 1, seq_len):
                window = ids[start:start + seq_len + 1]
                rows.append(window + [PAD_ID] * (seq_len + 1 - len(window)))
    if not rows:
        return np.zeros((0, seq_len + 1), np.int32)
    return np.asarray(rows, dtype=np.int32)
