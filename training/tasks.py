"""Synthetic recall tasks, generated reproducibly from a ``random.Random``.

Each task returns a ``Sample``: token ids plus the spans of answer tokens. The
same samples serve training (loss on the answer spans, or on everything) and
evaluation (exact match of every token of a span; for a causal model,
teacher-forced argmax over the span equals greedy generation of the span).

- ``passkey``: a 5-digit key hidden at a chosen depth in repeated filler
  (the classic landmark-attention passkey prompt), asked for at the end.
- ``niah``: multi-key needle in a haystack: several "magic number for <key>"
  needles in varied filler; one of them (at a chosen depth) is asked for.
- ``mqar``: multi-query associative recall: ``pairs`` ``key:value`` pairs (a
  parameter, not derived from the length), filler text, then half of the keys
  again in random order, each to be completed with its value.

Text is tokenised piece by piece with the model's tokenizer and concatenated;
filler is cut at a token, so every sample is exactly ``length`` tokens long,
answer included (the prompt is ``length`` minus the answer's tokens). A length
too short for a task's fixed text raises ``TaskLengthError`` with the minimum.
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


class TaskLengthError(ValueError):
    """The requested length is shorter than the task's fixed text."""

    def __init__(self, task: str, length: int, minimum: int):
        super().__init__(f"{task} needs at least {minimum} tokens (its fixed text), asked for {length}")
        self.task, self.length, self.minimum = task, length, minimum


def _filler(codec: Codec, n: int, next_sentence: Callable[[], str]) -> list[list[int]]:
    """Exactly ``n`` tokens of filler as a list of encoded sentences; the last one
    is cut at a token so the total is exact."""
    out: list[list[int]] = []
    left = n
    while left > 0:
        toks = _encode(codec, next_sentence())
        out.append(toks[:left])
        left -= len(out[-1])
    return out


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
    if length < fixed:
        raise TaskLengthError("passkey", length, fixed)
    sentence = _encode(codec, PASSKEY_FILLER)
    n_full, rest = divmod(length - fixed, len(sentence))
    before = round(depth * n_full)
    b = _Builder(codec)
    b.add(PASSKEY_INTRO)
    b.extend(sentence[:rest])           # the cut sentence first: the text around needle and question is whole
    for _ in range(before):
        b.extend(sentence)
    b.add(needle)
    for _ in range(n_full - before):
        b.extend(sentence)
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
    """Multi-key NIAH: ``needles`` "magic number for <key>" lines in varied filler, the asked one at ``depth``."""
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
    if length < fixed:
        raise TaskLengthError("niah", length, fixed)
    # varied filler sentences, exactly the rest of the length (the last one cut)
    filler = _filler(codec, length - fixed, lambda: rng.choice(HAYSTACK) + " ")
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
            b.extend(filler[i])
    b.add(question)
    b.add(answer, answer=True)
    return Sample(b.ids, b.spans, {"task": "niah", "depth": depth, "needles": needles})


# --- multi-query associative recall --------------------------------------------------

def mqar(rng: random.Random, codec: Codec, length: int, pairs: int = 16, query_frac: float = 0.5) -> Sample:
    """``abc:123 def:456 ...``, ``\\n``, filler sentences up to ``length``, ``\\n``, then
    queries ``def:456 ...`` (values are answers). ``pairs`` is the number of
    key-value pairs, whatever the length: capacity and distance vary apart."""
    if not 1 <= pairs <= 26 ** 3:
        raise ValueError(f"mqar: pairs must be in 1..{26 ** 3}, got {pairs}")
    n_queries = max(1, int(pairs * query_frac))
    codes = rng.sample(range(26 ** 3), pairs)
    keys = ["".join(string.ascii_lowercase[(c // 26 ** i) % 26] for i in range(3)) for c in codes]
    values = [f"{rng.randint(0, 999):03d}" for _ in keys]
    asked = rng.sample(range(pairs), n_queries)
    fixed = (sum(_n_tokens(codec, f"{k}:{v} ") for k, v in zip(keys, values)) + 2 * _n_tokens(codec, "\n")
             + sum(_n_tokens(codec, f"{keys[j]}:") + _n_tokens(codec, values[j]) + _n_tokens(codec, " ")
                   for j in asked))
    if length < fixed:
        raise TaskLengthError("mqar", length, fixed)
    b = _Builder(codec)
    for k, v in zip(keys, values):
        b.add(f"{k}:{v} ")
    b.add("\n")
    for toks in _filler(codec, length - fixed, lambda: rng.choice(HAYSTACK) + " "):
        b.extend(toks)
    b.add("\n")
    for j in asked:
        b.add(f"{keys[j]}:")
        b.add(values[j], answer=True)
        b.add(" ")
    return Sample(b.ids, b.spans, {"task": "mqar", "pairs": pairs, "queries": n_queries})


TASKS: dict[str, Callable[..., Sample]] = {"passkey": passkey, "niah": niah, "mqar": mqar}
