"""Training and evaluation data: token sources, a weighted mixture, and packing.

``--data`` takes one source per flag, ``KIND[:PATH][?key=value&...][@WEIGHT]``:

  text:DIR_OR_FILE?ext=.py,.txt&split=train&heldout_pct=5   local text files, one document per file
  jsonl:FILE?field=text&split=heldout                        one document per JSON line
  hf:NAME?config=en&split=train&field=text                   Hugging Face `datasets`, streaming
  passkey?min_len=256&max_len=2048&loss=answers              synthetic recall (also: niah, mqar)

``split`` picks a deterministic subset of a local corpus (by a hash of the
file path or line number), so training and held-out perplexity never share a
document. Documents are joined with EOS and cut into ``seq_len`` windows;
each window starts from a zero state.

Everything here is a pure function of (seed, rank) plus a cursor, and
``state_dict`` captures the cursor, the mixture's RNG and the partly used
document, so a resumed run sees exactly the tokens an uninterrupted one would.
"""
from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from training.errors import UsageError
from training.tasks import TASKS, TaskLengthError

if TYPE_CHECKING:
    import torch

IGNORE = -100


# --- tokenizer -------------------------------------------------------------------------

class TextCodec:
    """The model's tokenizer (tokenizer.json, via `tokenizers`). A byte-level
    tokenizer (token id == byte) is detected and bypassed: a corpus of tens of MB
    then encodes in milliseconds."""

    def __init__(self, tokenizer_file: str | Path, eos_id: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.eos_id = int(eos_id)
        probe = "Hé\n\t~ {x}"
        self.is_bytes = self.tokenizer.encode(probe, add_special_tokens=False).ids == list(probe.encode())
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, eos_id: int | None = None) -> "TextCodec":
        model_dir = Path(model_dir)
        tok = model_dir / "tokenizer.json"
        if not tok.is_file():
            raise UsageError(f"{model_dir}: no tokenizer.json (the checkpoint needs its tokenizer for --data)")
        if eos_id is None:
            eos_id = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
        if eos_id is None:
            raise UsageError(f"{model_dir}: config.json has no eos_token_id (needed to join documents)")
        return cls(tok, eos_id)

    def encode(self, text: str) -> list[int]:
        if self.is_bytes:
            return list(text.encode("utf-8"))
        if len(text) <= 256:   # short pieces (task templates, filler) repeat a lot
            hit = self._cache.get(text)
            if hit is None:
                hit = self._cache[text] = self.tokenizer.encode(text, add_special_tokens=False).ids
            return list(hit)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.is_bytes:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids)


# --- spec parsing ----------------------------------------------------------------------

SOURCE_KINDS = ("text", "jsonl", "hf", *TASKS)


@dataclass
class SourceSpec:
    kind: str
    path: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    text: str = ""
    flag: str = "--data"                  # the option it came from, named in errors

    def opt(self, key: str, default=None, cast=str):
        if key not in self.options:
            return default
        try:
            return cast(self.options[key])
        except ValueError:
            raise UsageError(f"{self.flag} {self.text}: option {key}={self.options[key]!r} is not a valid "
                             f"{cast.__name__}") from None


def parse_source_spec(text: str, flag: str = "--data") -> SourceSpec:
    """``KIND[:PATH][?k=v&...][@WEIGHT]`` -> SourceSpec (syntax only; files checked later)."""
    rest, weight = text, 1.0
    if "@" in rest:
        rest, w = rest.rsplit("@", 1)
        try:
            weight = float(w)
        except ValueError:
            raise UsageError(f"{flag} {text}: weight {w!r} after '@' is not a number") from None
        if weight <= 0:
            raise UsageError(f"{flag} {text}: weight must be positive")
    options: dict[str, str] = {}
    if "?" in rest:
        rest, q = rest.split("?", 1)
        options = dict(parse_qsl(q, keep_blank_values=True, strict_parsing=False))
    kind, _, path = rest.partition(":")
    if kind not in SOURCE_KINDS:
        raise UsageError(f"{flag} {text}: unknown kind {kind!r} (one of {', '.join(SOURCE_KINDS)})")
    if kind in ("text", "jsonl", "hf") and not path:
        raise UsageError(f"{flag} {text}: {kind} needs a path or name, e.g. {kind}:/data/corpus")
    return SourceSpec(kind, path or None, options, weight, text, flag)


# --- documents and sources -------------------------------------------------------------

@dataclass
class Document:
    ids: list[int]
    supervised: list[bool] | None = None     # None: every token is a training target
    whole: bool = False                      # keep in one window (a recall task: no state crosses windows)


class Source:
    """Yields documents in a fixed order for (seed, rank); the cursor is its state."""

    def next_document(self) -> Document:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class SyntheticSource(Source):
    """Document i of rank r is a pure function of (seed, r, task, i)."""

    def __init__(self, task: str, codec: TextCodec, seed: int, rank: int, min_len: int, max_len: int,
                 loss: str = "answers", task_options: dict | None = None):
        if not 0 < min_len <= max_len:
            raise UsageError(f"{task}: need 0 < min_len <= max_len, got {min_len}, {max_len}")
        if loss not in ("answers", "all"):
            raise UsageError(f"{task}: loss must be 'answers' or 'all', got {loss!r}")
        self.task, self.codec, self.seed, self.rank = task, codec, seed, rank
        self.min_len, self.max_len, self.loss = min_len, max_len, loss
        self.task_options = task_options or {}
        self.index = 0

    def sample(self, index: int):
        rng = random.Random(f"{self.seed}/{self.rank}/{self.task}/{index}")
        length = rng.randint(self.min_len, self.max_len)
        state = rng.getstate()
        try:
            return TASKS[self.task](rng, self.codec, length, **self.task_options)
        except TaskLengthError as e:   # min_len below the task's fixed text: its shortest sample instead
            rng.setstate(state)
            return TASKS[self.task](rng, self.codec, e.minimum, **self.task_options)

    def next_document(self) -> Document:
        s = self.sample(self.index)
        self.index += 1
        if self.loss == "all":
            return Document(s.ids, whole=True)
        mask = [False] * len(s.ids)
        for a, b in s.spans:
            mask[a:b] = [True] * (b - a)
        return Document(s.ids, mask, whole=True)

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def _split_mask(keys: list[str], split: str, heldout_pct: float) -> list[bool]:
    """Which of a corpus's documents (by key: relative path or line number) are in
    ``split``. A document is held out when a hash of its key falls in the first
    ``heldout_pct`` percent; a corpus of 2 or more documents where none does
    (likely below ~20 documents at 5%) holds out the one with the smallest hash,
    so ``split=heldout`` is never empty while ``split=train`` keeps the rest."""
    if split == "all":
        return [True] * len(keys)
    hashes = [zlib.crc32(k.encode()) % 10000 for k in keys]
    held = [h < heldout_pct * 100 for h in hashes]
    if not any(held) and len(keys) >= 2 and heldout_pct > 0:
        held[min(range(len(keys)), key=lambda i: (hashes[i], keys[i]))] = True
    return held if split == "heldout" else [not h for h in held]


class ListSource(Source):
    """A fixed list of documents (files or JSON lines), shuffled per epoch; rank r
    of W takes every W-th document of each epoch's order."""

    def __init__(self, name: str, loaders: list, codec: TextCodec, seed: int, rank: int, world: int,
                 shuffle: bool = True, flag: str = "--data"):
        if not loaders:
            raise UsageError(f"{flag} {name}: no documents (check the path, ext= and split=)")
        self.name, self.loaders, self.codec = name, loaders, codec
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.epoch, self.pos = 0, rank
        self._order_epoch, self._order = -1, []

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            order = list(range(len(self.loaders)))
            if self.shuffle:
                random.Random(f"{self.seed}/{self.name}/{epoch}").shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def next_document(self) -> Document:
        if self.pos >= len(self.loaders):
            self.epoch, self.pos = self.epoch + 1, self.rank % len(self.loaders)
        idx = self._order_for(self.epoch)[self.pos]
        self.pos += self.world
        return Document(self.codec.encode(self.loaders[idx]()))

    def documents_once(self):
        """Every document once, in corpus order (held-out evaluation)."""
        for load in self.loaders:
            yield Document(self.codec.encode(load()))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def _check_split_nonempty(spec: SourceSpec, total: int, chosen: int) -> None:
    if total and not chosen:
        raise UsageError(f"{spec.flag} {spec.text}: split={spec.opt('split')} leaves no documents of {total} "
                         "(a train/held-out split needs at least 2; use split=all)")


def _text_loaders(spec: SourceSpec) -> list:
    root = Path(spec.path)
    if not root.exists():
        raise UsageError(f"{spec.flag} {spec.text}: data file not found: {root}")
    exts = tuple(e if e.startswith(".") else "." + e for e in spec.opt("ext", ".txt,.md,.py").split(",") if e)
    split, pct = spec.opt("split", "all"), spec.opt("heldout_pct", 5.0, float)
    if split not in ("all", "train", "heldout"):
        raise UsageError(f"{spec.flag} {spec.text}: split must be all, train or heldout")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in exts)
    mask = _split_mask([str(f.relative_to(root) if root.is_dir() else f.name) for f in files], split, pct)
    _check_split_nonempty(spec, len(files), sum(mask))
    return [lambda f=f: f.read_text(encoding="utf-8", errors="replace") for f, keep in zip(files, mask) if keep]


def _jsonl_loaders(spec: SourceSpec) -> list:
    path = Path(spec.path)
    if not path.is_file():
        raise UsageError(f"{spec.flag} {spec.text}: data file not found: {path}")
    fld, split, pct = spec.opt("field", "text"), spec.opt("split", "all"), spec.opt("heldout_pct", 5.0, float)
    texts, keys = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)[fld]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{path}:{n + 1}: not a JSON object with field {fld!r}") from None
            keys.append(str(n))
    mask = _split_mask(keys, split, pct)
    _check_split_nonempty(spec, len(texts), sum(mask))
    texts = [t for t, keep in zip(texts, mask) if keep]
    return [lambda t=t: t for t in texts]


class HFStreamSource(Source):
    """A Hugging Face dataset read as a stream; its state is how many rows were used."""

    def __init__(self, spec: SourceSpec, codec: TextCodec, rank: int, world: int):
        try:
            import datasets
        except ImportError:
            raise UsageError(f"{spec.flag} {spec.text}: needs the `datasets` package (pip install datasets)") from None
        self.spec, self.codec, self.rank, self.world = spec, codec, rank, world
        self.field = spec.opt("field", "text")
        self._datasets = datasets
        self.consumed, self.epoch = 0, 0
        self._it = None

    def _open(self):
        ds = self._datasets.load_dataset(self.spec.path, self.spec.opt("config"),
                                         split=self.spec.opt("split", "train"), streaming=True)
        if self.world > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
        return iter(ds.skip(self.consumed) if self.consumed else ds)

    def next_document(self) -> Document:
        if self._it is None:
            self._it = self._open()
        try:
            row = next(self._it)
        except StopIteration:
            self.epoch, self.consumed, self._it = self.epoch + 1, 0, None
            return self.next_document()
        self.consumed += 1
        return Document(self.codec.encode(str(row[self.field])))

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.consumed, self.epoch, self._it = int(state["consumed"]), int(state["epoch"]), None


def build_source(spec: SourceSpec, codec: TextCodec, seq_len: int, seed: int = 0, rank: int = 0,
                 world: int = 1, shuffle: bool = True) -> Source:
    if spec.kind in TASKS:
        known = {"min_len", "max_len", "loss"}
        task_options = {}
        for k, v in spec.options.items():
            if k in known:
                continue
            try:
                task_options[k] = float(v) if "." in v else int(v)
            except ValueError:
                raise UsageError(f"{spec.flag} {spec.text}: option {k}={v!r} is not a number") from None
        src = SyntheticSource(spec.kind, codec, seed, rank, spec.opt("min_len", max(16, seq_len // 8), int),
                              spec.opt("max_len", seq_len, int), spec.opt("loss", "answers"), task_options)
        try:   # options the task does not take show up now, not in the middle of a run
            src.sample(0)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{spec.flag} {spec.text}: {e}") from None
        return src
    if spec.kind == "text":
        return ListSource(spec.text, _text_loaders(spec), codec, seed, rank, world, shuffle, spec.flag)
    if spec.kind == "jsonl":
        return ListSource(spec.text, _jsonl_loaders(spec), codec, seed, rank, world, shuffle, spec.flag)
    return HFStreamSource(spec, codec, rank, world)


# --- packing -------------------------------------------------------------------------

class PackedStream:
    """Documents from a weighted mixture, joined with EOS, cut into windows of
    ``seq_len``. ``labels`` equal ``ids`` except -100 where a token is not a
    target (the prompt part of a recall task trained on answers only)."""

    def __init__(self, sources: list[Source], weights: list[float], seq_len: int, eos_id: int,
                 seed: int = 0, rank: int = 0):
        self.sources, self.weights = sources, weights
        self.seq_len, self.eos_id = seq_len, eos_id
        self.rng = random.Random(f"mixture/{seed}/{rank}")
        self.buf_ids: list[int] = []
        self.buf_labels: list[int] = []

    def _add_document(self) -> None:
        src = self.rng.choices(self.sources, self.weights)[0] if len(self.sources) > 1 else self.sources[0]
        doc = src.next_document()
        self._keep_task_in_one_window(doc)
        self.buf_ids += doc.ids + [self.eos_id]
        if doc.supervised is None:
            self.buf_labels += doc.ids + [self.eos_id]
        else:
            self.buf_labels += [t if m else IGNORE for t, m in zip(doc.ids, doc.supervised)] + [IGNORE]

    def _keep_task_in_one_window(self, doc: Document) -> None:
        """A recall task cut by a window boundary cannot be answered (no state is
        carried between windows), so a task document that would straddle one
        starts at the next window instead; the gap is EOS padding with no loss."""
        if not doc.whole or len(doc.ids) + 1 > self.seq_len:
            return
        used = len(self.buf_ids) % self.seq_len      # the buffer's front is window-aligned
        if used and used + len(doc.ids) + 1 > self.seq_len:
            gap = self.seq_len - used
            self.buf_ids += [self.eos_id] * gap
            self.buf_labels += [IGNORE] * gap

    def next_sequence(self) -> tuple[list[int], list[int]]:
        while len(self.buf_ids) < self.seq_len:
            self._add_document()
        T = self.seq_len
        ids, labels = self.buf_ids[:T], self.buf_labels[:T]
        self.buf_ids, self.buf_labels = self.buf_ids[T:], self.buf_labels[T:]
        return ids, labels

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch   # here, so the CLIs parse and check --data without loading torch

        rows = [self.next_sequence() for _ in range(batch_size)]
        return (torch.tensor([r[0] for r in rows], dtype=torch.long),
                torch.tensor([r[1] for r in rows], dtype=torch.long))

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "buf_ids": list(self.buf_ids),
                "buf_labels": list(self.buf_labels),
                "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.buf_ids, self.buf_labels = list(state["buf_ids"]), list(state["buf_labels"])
        for s, st in zip(self.sources, state["sources"], strict=True):
            s.load_state_dict(st)


def build_stream(specs: list[str], codec: TextCodec, seq_len: int, seed: int = 0, rank: int = 0,
                 world: int = 1) -> PackedStream:
    """Parse ``--data`` flags and check every source (files exist, options valid) up front."""
    if not specs:
        raise UsageError("no --data given")
    parsed = [parse_source_spec(s) for s in specs]
    sources = [build_source(p, codec, seq_len, seed, rank, world) for p in parsed]
    return PackedStream(sources, [p.weight for p in parsed], seq_len, codec.eos_id, seed, rank)


def heldout_windows(spec_text: str, codec: TextCodec, seq_len: int, max_tokens: int):
    """Fixed ``seq_len`` windows over a held-out corpus, in corpus order, each
    document once (EOS-joined), up to ``max_tokens``: for perplexity."""
    spec = parse_source_spec(spec_text, "--heldout")
    if spec.kind in TASKS:
        raise UsageError(f"--heldout {spec_text}: perplexity needs text, not a synthetic task")
    src = build_source(spec, codec, seq_len, shuffle=False)
    docs = src.documents_once() if isinstance(src, ListSource) else iter(src.next_document, None)
    buf: list[int] = []
    produced = 0
    for doc in docs:
        buf += doc.ids + [codec.eos_id]
        while len(buf) >= seq_len and produced + seq_len <= max_tokens:
            yield buf[:seq_len]
            buf = buf[seq_len:]
            produced += seq_len
        if produced + seq_len > max_tokens:
            return
