"""Incremental detokenization with a byte-level tokenizer (tokens end inside
UTF-8 characters), stop strings with holdback, and a sequence's stop rules."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from model_registry.tokenizer import EOS_ID, save_byte_tokenizer
from statex_serve.engine.base import GenerationRequest, SamplingParams
from statex_serve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher, TokenStrings
from statex_serve.engine.sequence import RequestState


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("bytetok")
    save_byte_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


def _stream(tok, ids, prompt=(), fast=True):
    detok = IncrementalDetokenizer(tok, list(prompt), byte_fast_path=fast)
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    return pieces


PATHS = pytest.mark.parametrize("fast", [True, False], ids=["byte-table", "window"])


@PATHS
def test_never_splits_a_character(tok, fast):
    text = "héllo wörld € 😀 日本語!"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())          # one token per byte
    pieces = _stream(tok, ids, prompt=tok.encode("say: ", add_special_tokens=False), fast=fast)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert pieces.count("") >= 3                  # multi-byte characters were held back


@PATHS
def test_arbitrary_bytes_concatenate_to_the_full_decode(tok, fast):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.choice([rng.randrange(256), rng.randrange(128, 256), EOS_ID]) for _ in range(rng.randrange(1, 30))]
        prompt = [rng.randrange(256) for _ in range(rng.randrange(0, 6))]   # may end mid-character
        assert "".join(_stream(tok, ids, prompt, fast)) == tok.decode(ids, skip_special_tokens=True)


@PATHS
def test_long_invalid_runs_still_concatenate_to_the_full_decode(tok, fast):
    """Runs of bytes >= 0x80 and of EOS long enough that held text is released early."""
    rng = random.Random(1)
    for _ in range(150):
        ids = []
        while len(ids) < 120:
            kind = rng.randrange(4)
            run = rng.randrange(1, 40)
            ids += [rng.randrange(128, 256) if kind < 2 else EOS_ID if kind == 2 else rng.randrange(256)
                    for _ in range(run)]
        prompt = [rng.randrange(256) for _ in range(rng.randrange(0, 6))]
        assert "".join(_stream(tok, ids, prompt, fast)) == tok.decode(ids, skip_special_tokens=True)


def test_the_byte_table_is_taken_for_a_byte_level_tokenizer_only(tok):
    from statex_serve.engine.detokenizer import byte_table

    table = byte_table(tok)
    assert table is byte_table(tok)                       # built once per tokenizer
    assert table[ord("a")] == b"a" and table[0xE2] == bytes([0xE2]) and table[EOS_ID] is None
    assert IncrementalDetokenizer(tok, [])._table is table
    assert IncrementalDetokenizer(tok, [], skip_special_tokens=False)._table is None
    assert byte_table(object()) is None


@pytest.mark.parametrize("stuck", [[0x80], [0xE2, 0x82], [EOS_ID], [0xF0, 0x41, 0xC3]])
def test_tokens_that_never_complete_text_keep_the_window_short(tok, stuck):
    """Invalid bytes or skipped special tokens, thousands of times: the text still
    concatenates to the full decode, it comes out as it goes, and the window that
    is re-decoded per token stays a few tokens long (it grew with the sequence)."""
    ids = [ord("a")] + stuck * (3000 // len(stuck)) + [0xE2, 0x82, 0xAC, ord("!")]
    detok = IncrementalDetokenizer(tok, [], byte_fast_path=False)
    pieces, widest = [], 0
    for t in ids:
        pieces.append(detok.add(t))
        widest = max(widest, len(detok.ids) - detok.prefix_offset)
    pieces.append(detok.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert widest <= 3 * 8
    assert "".join(pieces).endswith("€!")
    if stuck != [EOS_ID]:
        assert sum(1 for p in pieces[:1000] if p) > 50          # released as it goes, not at the end


def test_stop_string_matcher_holds_back_and_cuts():
    m = StopStringMatcher(("STOP", "xy"))
    assert m.add("abcS") is None
    assert m.release(final=False) == "abc"        # "S" might start "STOP"
    assert m.add("TO") is None and m.release(final=False) == ""
    assert m.add("Pzzz") == "STOP"
    assert m.text == "abc" and m.release(final=True) == ""
    m = StopStringMatcher(("xy", "abcxy"), include_stop_str_in_output=True)
    assert m.add("..abcx") is None
    assert m.release(final=False) == ".."          # "abcx" might still become "abcxy"
    assert m.add("y!") == "abcxy"                  # earliest match wins
    assert m.text == "..abcxy"
    m = StopStringMatcher(())
    m.add("anything")
    assert m.release(final=False) == "anything"


def _request(tok, prompt, **params):
    req = RequestState(GenerationRequest("r", prompt, SamplingParams(**params)))
    req.start([0], tok, frozenset({EOS_ID}), "cpu")
    return req.sequences[0]


def test_sequence_stop_rules(tok):
    ab = tok.encode("ab", add_special_tokens=False)
    # EOS stops (its text is not added), unless ignore_eos
    seq = _request(tok, ab, max_tokens=10, temperature=0)
    for t in tok.encode("hi", add_special_tokens=False) + [EOS_ID]:
        seq.append(t, None, 10)
    assert seq.finish_reason == "stop" and seq.stop_reason is None
    assert seq.take_delta().text == "hi"
    seq = _request(tok, ab, max_tokens=3, temperature=0, ignore_eos=True)
    for t in [EOS_ID, EOS_ID, EOS_ID]:
        seq.append(t, None, 3)
    assert seq.finish_reason == "length"
    # min_tokens: EOS is banned for sampling and ignored for stopping before it
    seq = _request(tok, ab, max_tokens=10, temperature=0, min_tokens=2)
    assert seq.sampling_row().banned_token_ids == (EOS_ID,)
    # stop strings cut the text; stop_token_ids report the id
    seq = _request(tok, ab, max_tokens=20, temperature=0, stop=("lo w",))
    for t in tok.encode("hello world", add_special_tokens=False):
        if not seq.finished:
            seq.append(t, None, 20)
    assert seq.finish_reason == "stop" and seq.stop_reason == "lo w"
    assert seq.take_delta().text == "hel"
    seq = _request(tok, ab, max_tokens=20, temperature=0, stop_token_ids=(ord("!"),))
    for t in tok.encode("yes!", add_special_tokens=False):
        seq.append(t, None, 20)
    assert (seq.finish_reason, seq.stop_reason, seq.take_delta().text) == ("stop", ord("!"), "yes")


def test_token_strings_give_exact_bytes(tok):
    ts = TokenStrings(tok)
    assert ts.byte_level
    assert ts.bytes(195) == [195] and ts.text(195) == "\ufffd"
    assert ts.bytes(ord("a")) == [97] and ts.text(ord("a")) == "a"
    assert ts.text(EOS_ID) == "<|endoftext|>"
