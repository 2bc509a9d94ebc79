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
@pytest.mark.parametrize("length", [200, 1000])
def test_tasks_hit_the_length_and_mark_the_answers(task, length, codec):
    s = TASKS[task](random.Random(7), codec, length)
    assert 0.85 * length <= len(s.ids) <= length or length == 200 and len(s.ids) <= 300
    assert s.spans and all(0 < a < b <= len(s.ids) for a, b in s.spans)
    text = codec.decode(s.ids)
    answers = [codec.decode(s.ids[a:b]).strip() for a, b in s.spans]
    assert all(a.isdigit() for a in answers)
    if task == "passkey":
        assert f"The pass key is {answers[0]}." in text
    if task == "niah":
        key = text.rsplit("magic number for ", 1)[1].split(" ")[0]
        assert f"The magic number for {key} is {answers[0]}." in text
    if task == "mqar":
        pairs = dict(p.split(":") for p in text.split("\n")[0].split())
        queries = [q.split(":") for q in text.split("\n")[1].split()]
        assert [pairs[k] for k, _ in queries] == answers


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
    for _ in range(40):
        ids, _ = stream.next_sequence()
        starts = [i for i in range(len(ids) - len(intro)) if ids[i:i + len(intro)] == intro]
        ends = [i for i in range(len(ids) - len(question)) if ids[i:i + len(question)] == question]
        # every passkey that starts in this window also asks its question in it
        assert len(starts) == len(ends)
