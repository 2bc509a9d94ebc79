"""Data: synthetic recall tasks, sources, EOS packing, resumable cursors."""
from __future__ import annotations

import json
import random
import sys
import types

import pytest

from model_registry.tokenizer import EOS_ID, save_byte_tokenizer
from training.data import IGNORE, TextCodec, build_stream, heldout_windows, parse_source_spec
from training.errors import UsageError
from training.tasks import TASKS


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(d)
    return TextCodec(d / "tokenizer.json", EOS_ID)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document {i} " + "lorem ipsum " * (i + 3))
    (root / "skip.bin").write_text("not text")
    return root


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [400, 1000, 1003])
def test_tasks_hit_the_length_and_mark_the_answers(task, length, codec):
    s = TASKS[task](random.Random(7), codec, length)
    assert len(s.ids) == length                       # the label is the sample's length, answer included
    assert s.spans and all(0 < a < b <= len(s.ids) for a, b in s.spans)
    text = codec.decode(s.ids)
    answers = [codec.decode(s.ids[a:b]).strip() for a, b in s.spans]
    assert all(a.isdigit() for a in answers)
    if task == "passkey":
        assert f"The pass key is {answers[0]}." in text and text.endswith(f"The pass key is {answers[0]}")
    if task == "niah":
        key = text.rsplit("magic number for ", 1)[1].split(" ")[0]
        assert f"The magic number for {key} is {answers[0]}." in text
    if task == "mqar":
        lines = text.split("\n")
        assert len(lines) == 3                        # pairs, filler, queries
        pairs = dict(p.split(":") for p in lines[0].split())
        queries = [q.split(":") for q in lines[2].split()]
        assert len(pairs) == 16 and len(queries) == 8  # the default: 16 pairs, half asked
        assert [pairs[k] for k, _ in queries] == answers


class WordCodec:
    """A tokenizer whose tokens are whole words and spaces: lengths must still be exact."""

    def encode(self, text):
        import re

        return [hash(w) % 50000 for w in re.findall(r"\S+|\s", text)]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_are_exact_for_multi_byte_tokens_and_refuse_short_lengths(task):
    from training.tasks import TaskLengthError

    codec = WordCodec()
    for length in (300, 301, 777):
        assert len(TASKS[task](random.Random(length), codec, length).ids) == length
    with pytest.raises(TaskLengthError) as e:
        TASKS[task](random.Random(1), codec, 20)
    # the minimum it names is exactly the fixed text: it fits, one less does not
    assert len(TASKS[task](random.Random(1), codec, e.value.minimum).ids) == e.value.minimum
    with pytest.raises(TaskLengthError):
        TASKS[task](random.Random(1), codec, e.value.minimum - 1)


def test_mqar_pairs_do_not_depend_on_the_length(codec):
    for length in (300, 2000, 8000):
        s = TASKS["mqar"](random.Random(length), codec, length, pairs=8)
        assert len(s.ids) == length and len(s.spans) == 4 and s.meta["pairs"] == 8
    s = TASKS["mqar"](random.Random(0), codec, 2000, pairs=100, query_frac=1.0)
    assert len(s.spans) == 100 and len(s.ids) == 2000


def test_synthetic_source_below_a_tasks_minimum_gives_its_shortest_sample(codec):
    from training.data import SyntheticSource

    src = SyntheticSource("passkey", codec, seed=0, rank=0, min_len=16, max_len=32)
    lengths = {len(src.next_document().ids) for _ in range(5)}
    assert len(lengths) == 1 and 200 < lengths.pop() < 300   # the template alone, every time


def test_tasks_are_reproducible_and_depth_places_the_needle(codec):
    a = TASKS["niah"](random.Random(3), codec, 600, depth=0.0)
    b = TASKS["niah"](random.Random(3), codec, 600, depth=0.0)
    assert a.ids == b.ids
    for depth in (0.0, 1.0):
        s = TASKS["passkey"](random.Random(1), codec, 800, depth=depth)
        pos = codec.decode(s.ids).index("The pass key is") / len(s.ids)
        assert (pos < 0.3) if depth == 0.0 else (pos > 0.7)


def test_packing_joins_documents_with_eos_and_masks_prompts(codec, corpus):
    stream = build_stream([f"text:{corpus}", "passkey?min_len=40&max_len=80"], codec, seq_len=128, seed=1)
    ids, labels = stream.next_batch(16)
    assert ids.shape == labels.shape == (16, 128)
    flat_ids, flat_labels = ids.flatten().tolist(), labels.flatten().tolist()
    assert EOS_ID in flat_ids
    # text tokens (and EOS after text) are targets; passkey prompts are not, its answers are
    supervised = [t == y for t, y in zip(flat_ids, flat_labels)]
    assert 0.2 < sum(supervised) / len(supervised) < 1.0
    assert all(y == IGNORE or y == t for t, y in zip(flat_ids, flat_labels))
    assert "lorem ipsum" in codec.decode(flat_ids)


def test_stream_state_resumes_exactly(codec, corpus):
    specs = [f"text:{corpus}@2", "mqar?min_len=20&max_len=60", "niah?min_len=60&max_len=90"]
    a = build_stream(specs, codec, 64, seed=5)
    a.next_batch(7)
    state = json.loads(json.dumps(a.state_dict()))          # must survive JSON
    want = [a.next_batch(3) for _ in range(4)]
    b = build_stream(specs, codec, 64, seed=5)
    b.load_state_dict(state)
    got = [b.next_batch(3) for _ in range(4)]
    assert all((w[0] == g[0]).all() and (w[1] == g[1]).all() for w, g in zip(want, got))
    c = build_stream(specs, codec, 64, seed=6)
    assert not (c.next_batch(3)[0] == build_stream(specs, codec, 64, seed=5).next_batch(3)[0]).all()


def test_text_and_jsonl_splits_are_disjoint_and_complete(codec, corpus, tmp_path):
    def docs(spec):
        from training.data import build_source

        return {codec.decode(d.ids) for d in build_source(parse_source_spec(spec), codec, 64,
                                                           shuffle=False).documents_once()}

    train, held, every = (docs(f"text:{corpus}?split={s}&heldout_pct=20") for s in ("train", "heldout", "all"))
    assert train and held and not train & held and train | held == every and len(every) == 40
    lines = tmp_path / "d.jsonl"
    lines.write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(50)))
    jt, jh = (docs(f"jsonl:{lines}?field=body&split={s}&heldout_pct=20") for s in ("train", "heldout"))
    assert len(jt) + len(jh) == 50 and not jt & jh
    windows = list(heldout_windows(f"text:{corpus}?split=heldout&heldout_pct=20", codec, 32, 10**6))
    assert windows and all(len(w) == 32 for w in windows)


@pytest.mark.parametrize("n", [2, 16])
def test_a_small_corpus_still_gets_a_heldout_document(n, codec, tmp_path):
    """16 files at the default 5%: no file's hash falls in the held-out range, yet
    split=heldout must not be empty (and train keeps the rest, disjoint)."""
    import zlib

    from training.data import build_source

    for i in range(n):
        (tmp_path / f"file{i}.txt").write_text(f"file {i} " + "words " * 40)
    assert not any(zlib.crc32(f"file{i}.txt".encode()) % 10000 < 500 for i in range(n))   # the case in point

    def docs(split):
        return {codec.decode(d.ids) for d in build_source(parse_source_spec(f"text:{tmp_path}?split={split}"), codec,
                                                           64, shuffle=False).documents_once()}

    train, held = docs("train"), docs("heldout")
    assert len(held) == 1 and len(train) == n - 1 and not train & held
    assert list(heldout_windows(f"text:{tmp_path}?split=heldout", codec, 32, 10**6))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "only.txt").write_text("a single document")
    with pytest.raises(UsageError, match="split=heldout leaves no documents of 1 .*needs at least 2"):
        build_source(parse_source_spec(f"text:{tmp_path / 'one'}?split=heldout"), codec, 64)


def test_ranks_read_disjoint_documents(codec, corpus):
    from training.data import build_source

    seen = []
    for rank in (0, 1):
        src = build_source(parse_source_spec(f"text:{corpus}"), codec, 64, seed=0, rank=rank, world=2)
        seen.append({codec.decode(src.next_document().ids) for _ in range(20)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40


def test_hf_streaming_source_resumes_by_skipping(codec, monkeypatch):
    """`datasets` is optional; a stand-in module checks how we call it."""
    rows = [{"text": f"row {i}"} for i in range(10)]

    class FakeStream:
        def __init__(self, start=0):
            self.start = start

        def skip(self, n):
            return FakeStream(self.start + n)

        def __iter__(self):
            return iter(rows[self.start:])

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config, split, streaming: FakeStream()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    a = build_stream(["hf:some/corpus?split=train"], codec, 8, seed=0)
    a.next_batch(2)
    state = a.state_dict()
    want = a.next_batch(4)[0]
    b = build_stream(["hf:some/corpus?split=train"], codec, 8, seed=0)
    b.load_state_dict(state)
    assert (b.next_batch(4)[0] == want).all()


@pytest.mark.parametrize("spec,msg", [
    ("nonsense", "unknown kind"), ("text", "needs a path"), ("mqar@0", "weight must be positive"),
    ("mqar@x", "not a number"), ("text:/does/not/exist", "data file not found"),
    ("jsonl:/does/not/exist.jsonl", "data file not found"), ("passkey?min_len=100&max_len=10", "min_len"),
    ("niah?colour=3", "unexpected keyword"),
])
def test_bad_specs_are_usage_errors(spec, msg, codec):
    with pytest.raises(UsageError, match=msg):
        build_stream([spec], codec, 64)


def test_hf_without_datasets_is_a_usage_error(codec, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UsageError, match="needs the `datasets` package"):
        build_stream(["hf:x/y"], codec, 64)


def test_recall_tasks_never_straddle_a_window(tmp_path):
    """A task cut by a window boundary is unanswerable (no state crosses windows):
    every passkey document lies inside one window, whatever the mixture."""
    from model_registry.tokenizer import save_byte_tokenizer
    from training.data import TextCodec, build_stream

    save_byte_tokenizer(tmp_path)
    (tmp_path / "t.txt").write_text("plain text for the mixture. " * 200)
    codec = TextCodec(tmp_path / "tokenizer.json", eos_id=256)
    T = 512
    stream = build_stream([f"text:{tmp_path / 't.txt'}", "passkey?min_len=100&max_len=400&loss=all"], codec, T)
    question = list(b"What is the pass key?")
    intro = list(b"There is an important info")
    passkeys = 0
    for _ in range(40):
        ids, _ = stream.next_sequence()
        starts = [i for i in range(len(ids) - len(intro)) if ids[i:i + len(intro)] == intro]
        ends = [i for i in range(len(ids) - len(question)) if ids[i:i + len(question)] == question]
        # every passkey that starts in this window also asks its question in it
        assert len(starts) == len(ends)
        assert all(s < e for s, e in zip(starts, ends))      # and no question is left from the window before
        passkeys += len(starts)
    assert passkeys >= 3                                      # there were passkeys to cut (6 with this seed)
