"""Synthetic recall tasks, generated reproducibly from a ``random.Random``.

Each task returns a ``Sample``: token ids plus the spans of answer tokens. The
same samples serve training (loss on the answer spans, or on everything) and
evaluation (exact match of every token of a span; for a causal model,
teacher-forced argmax over the span equals greedy generation of the span).

- ``passkey``: a 5-digit key hidden at a chosen depth in repeated filler
  (the classic landmark-attention passkey prompt), asked for at the end.
- ``niah``: multi-key needle in a haystack: several "magic number for <key>"
  needles in varied filler; one of them (at a chosen depth) is asked for.
- ``mqar``: multi-query associative recall: ``key:value`` pairs, then half of
  the keys again in random order, each to be completed with its value.

Text is tokenised piece by piece with the model's tokenizer and concatenated,
so lengths are exact in tokens for any tokenizer.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable, Protocol


class Codec(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass
class Sample:
    ids: list[int]
    spans: list[tuple[int, int]]            # answer tokens ids[s:e]
    meta: dict = field(default_factory=dict)


class _Builder:
    """Concatenate encoded pieces, remembering where the answers are."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self.ids: list[int] = []
        self.spans: list[tuple[int, int]] = []

    def add(self, text: str, answer: bool = False) -> None:
        toks = _encode(self.codec, text)
        if answer:
            self.spans.append((len(self.ids), len(self.ids) + len(toks)))
        self.ids.extend(toks)

    def extend(self, toks: list[int]) -> None:
        self.ids.extend(toks)


def _encode(codec: Codec, text: str) -> list[int]:
    return list(codec.encode(text))


def _n_tokens(codec: Codec, text: str) -> int:
    return len(_encode(codec, text))


# --- passkey ---------------------------------------------------------------------------

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


def passkey(rng: random.Random, codec: Codec, length: int, depth: float | None = None) -> Sample:
    key = str(rng.randint(10000, 99999))
    depth = rng.random() if depth is None else depth
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    question = "What is the pass key? The pass key is"
    answer = f" {key}"
    fixed = sum(_n_tokens(codec, t) for t in (PASSKEY_INTRO, needle, question, answer))
    n_fill = max(0, (length - fixed) // _n_tokens(codec, PASSKEY_FILLER))
    before = round(depth * n_fill)
    b = _Builder(codec)
    b.add(PASSKEY_INTRO)
    for _ in range(before):
        b.add(PASSKEY_FILLER)
    b.add(needle)
    for _ in range(n_fill - before):
        b.add(PASSKEY_FILLER)
    b.add(question)
    b.add(answer, answer=True)
    return Sample(b.ids, b.spans, {"task": "passkey", "depth": depth, "key": key})


# --- multi-key needle in a haystack --------------------------------------------------

HAYSTACK = [
    "The river runs past the old mill and into the valley.",
    "Most of the town was asleep when the train arrived.",
    "A small boat drifted slowly across the quiet lake.",
    "The market opens early and closes before the evening rain.",
    "Children played in the park while their parents talked.",
    "The library keeps its oldest maps in a locked room.",
    "Snow covered the hills for most of the long winter.",
    "The baker starts work every morning before sunrise.",
    "An old clock in the hall struck noon twice that day.",
    "The road to the coast winds through fields of wheat.",
    "Birds gathered on the wires as the weather turned cold.",
    "The museum added a new wing for modern paintings.",
    "Fishermen mended their nets on the harbour wall.",
    "The garden was full of roses and tall sunflowers.",
    "A light wind carried the smell of pine from the forest.",
    "The students waited outside the hall for the results.",
]
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def niah(rng: random.Random, codec: Codec, length: int, needles: int = 4, depth: float | None = None) -> Sample:
    keys: list[str] = []
    while len(keys) < needles:
        k = _pseudo_word(rng)
        if k not in keys:
            keys.append(k)
    values = [str(rng.randint(100000, 999999)) for _ in keys]
    target = rng.randrange(needles)
    depth = rng.random() if depth is None else depth
    needle_text = [f"The magic number for {k} is {v}.\n" for k, v in zip(keys, values)]
    question = f"What is the magic number for {keys[target]}? The magic number for {keys[target]} is"
    answer = f" {values[target]}"
    intro = "Read the text and remember the magic numbers in it.\n"
    fixed = sum(_n_tokens(codec, t) for t in (intro, question, answer, *needle_text))
    # varied filler sentences up to the length budget
    filler: list[str] = []
    used = fixed
    while True:
        s = rng.choice(HAYSTACK) + " "
        n = _n_tokens(codec, s)
        if used + n > length:
            break
        filler.append(s)
        used += n
    # positions (in filler sentences) of each needle; the asked one at `depth`
    pos = [rng.randint(0, len(filler)) for _ in keys]
    pos[target] = round(depth * len(filler))
    b = _Builder(codec)
    b.add(intro)
    for i in range(len(filler) + 1):
        for j, p in enumerate(pos):
            if p == i:
                b.add(needle_text[j])
        if i < len(filler):
            b.add(filler[i])
    b.add(question)
    b.add(answer, answer=True)
    return Sample(b.ids, b.spans, {"task": "niah", "depth": depth, "needles": needles})


# --- multi-query associative recall --------------------------------------------------

def mqar(rng: random.Random, codec: Codec, length: int, pairs: int | None = None,
         query_frac: float = 0.5) -> Sample:
    """``abc:123 def:456 ...`` then ``\\n`` and queries ``def:456 ...`` (values are answers)."""
    unit = _n_tokens(codec, "abc:123 ")      # every pair has this shape
    if pairs is None:
        pairs = max(1, int((length - 2) / (unit * (1 + query_frac))))
    n_queries = max(1, int(pairs * query_frac))
    codes = rng.sample(range(26 ** 3), pairs)
    keys = ["".join(string.ascii_lowercase[(c // 26 ** i) % 26] for i in range(3)) for c in codes]
    values = [f"{rng.randint(0, 999):03d}" for _ in keys]
    b = _Builder(codec)
    for k, v in zip(keys, values):
        b.add(f"{k}:{v} ")
    b.add("\n")
    for j in rng.sample(range(pairs), n_queries):
        b.add(f"{keys[j]}:")
        b.add(values[j], answer=True)
        b.add(" ")
    return Sample(b.ids, b.spans, {"task": "mqar", "pairs": pairs, "queries": n_queries})


TASKS: dict[str, Callable[..., Sample]] = {"passkey": passkey, "niah": niah, "mqar": mqar}
