"""Incremental detokenization and stop strings, one generated sequence at a time.

Tokens can end in the middle of a UTF-8 character (a byte-level tokenizer emits
single bytes), so text is released only when the decoded window does not end in
U+FFFD; what is held back comes out with the next token or at the end (or,
after HOLD_LIMIT tokens, as the invalid bytes it is, so the window stays short). Stop
strings are matched on the text, and a tail of text that could still grow into
a stop string is held back from the stream until it either does (the sequence
stops and that text is cut) or cannot any more.
"""
from __future__ import annotations

import codecs
import weakref
from functools import lru_cache

from model_registry.tokenizer import bytes_to_unicode

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the first generated token, so tokenizers
# that render a token differently at the start of a text (SentencePiece's
# leading space) render it as it reads in context.
CONTEXT_TOKENS = 5
# A character is at most 4 bytes (tokens), so text still held back after this
# many tokens is invalid bytes or tokens that decode to nothing (skipped special
# tokens), not a character being completed. Without a bound, a sequence stuck
# on such tokens re-decodes an ever longer window at every token: quadratic
# host time on the engine thread that every request shares.
HOLD_LIMIT = 8


class IncrementalDetokenizer:
    """Text of ``token_ids`` (the generated ones), released in complete characters.

    The released pieces concatenate to ``tokenizer.decode(token_ids)`` (with the
    same ``skip_special_tokens``) for byte-level and SentencePiece tokenizers."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 byte_fast_path: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Byte-level BPE: each token is a fixed byte string, so the text is an
        # incremental UTF-8 decode of their concatenation (C, no re-decoding);
        # the general path below re-decodes a short window per token.
        self._table = byte_table(tokenizer) if byte_fast_path and skip_special_tokens else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if self._table is not None else None
        if self._utf8 is not None:
            return               # no window, no context decode, no special-id set: none is used
        # A fast tokenizer's Rust decoder directly: what transformers' decode()
        # calls underneath (cleanup off), without ~15 us of Python around it per
        # call, which at 64+ streams was most of an engine step's host time.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        # special tokens that decoding skips add no text: kept out of the window,
        # so a run of them (EOS under ignore_eos) costs nothing to re-decode
        self._skipped = frozenset(getattr(tokenizer, "all_special_ids", ()) or ()) if skip_special_tokens \
            else frozenset()
        self._prefix_text: str | None = None     # decode of the window [prefix_offset, read_offset)
        context = list(prompt_token_ids[-CONTEXT_TOKENS:])
        if context and REPLACEMENT_CHAR in self._decode(context):
            context = []          # the prompt ends mid-character: decoding after it would misalign
        self.ids: list[int] = context
        self.prefix_offset = 0               # start of the window that is re-decoded
        self.read_offset = len(context)      # tokens before this are released

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Take one more token; return the text it completes (maybe empty)."""
        if self._utf8 is not None:
            piece = self._table[token_id] if 0 <= token_id < len(self._table) else None
            return self._utf8.decode(piece) if piece else ""
        if token_id in self._skipped:
            return ""
        self.ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes as U+FFFD)."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._prefix_text is None:        # the window moved: decode its start once
            self._prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        prefix_text = self._prefix_text
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not final):
            held = len(self.ids) - self.read_offset
            return self._release_held(prefix_text, new_text) if held and held % HOLD_LIMIT == 0 else ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self._prefix_text = None
        return new_text[len(prefix_text):]

    def _release_held(self, prefix_text: str, new_text: str) -> str:
        """Release long-held text up to a split that changes no text now and
        leaves the last 3 tokens that carry bytes held (a character still to be
        completed has at most 3 of its bytes here); "" and keep holding if no
        split qualifies."""
        bearing, tried = 0, 0
        for k in range(len(self.ids) - 1, self.read_offset, -1):
            bearing += self._decode([self.ids[k]]) != ""
            if bearing < 3:
                continue
            head = self._decode(self.ids[self.prefix_offset:k])
            if head.startswith(prefix_text) and head + self._decode(self.ids[k:]) == new_text:
                self.prefix_offset, self.read_offset = self.read_offset, k
                self._prefix_text = None
                return head[len(prefix_text):]
            tried += 1
            if tried == 4:
                break
        return ""


class StopStringMatcher:
    """Accumulates a sequence's text, finds stop strings, and says how much of
    the text is safe to stream."""

    def __init__(self, stop: tuple[str, ...], include_stop_str_in_output: bool = False):
        self.stop = tuple(stop)
        self.include = include_stop_str_in_output
        self.max_len = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.released = 0          # characters of text already streamed

    def add(self, new_text: str, check: bool = True) -> str | None:
        """Append text; return the stop string that now occurs, else None. On a
        match, ``text`` is cut just before it (or just after it, with include).
        ``check=False`` (before min_tokens) only appends."""
        if not new_text:
            return None
        start = max(0, len(self.text) - self.max_len + 1)
        self.text += new_text
        if not self.stop or not check:
            return None
        best = None
        for s in self.stop:       # the earliest match wins
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s) if self.include else i]
        return s

    def _holdback(self) -> int:
        """Length of the longest tail of text that starts some stop string."""
        for k in range(min(self.max_len - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def release(self, final: bool) -> str:
        """Text not yet streamed that can be streamed now (all of it when final)."""
        end = len(self.text) if final else len(self.text) - self._holdback()
        if end <= self.released:
            return ""
        out = self.text[self.released:end]
        self.released = end
        return out


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _piece_bytes(piece: str) -> bytes | None:
    """A byte-level BPE piece's exact bytes; None if it is not one."""
    try:
        return bytes(_UNICODE_TO_BYTE[c] for c in piece)
    except KeyError:
        return None


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


_BYTE_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def byte_table(tokenizer) -> list[bytes | None] | None:
    """Each token id's exact bytes (None for a special token), when every other
    token of the tokenizer is a byte-level BPE piece; else None. Built once per
    tokenizer (a vocabulary walk) and shared by its sequences."""
    try:
        return _BYTE_TABLES[tokenizer]
    except KeyError:
        pass
    except TypeError:            # not weakly referenceable: build it every time would be too slow
        return None
    table = _build_byte_table(tokenizer)
    _BYTE_TABLES[tokenizer] = table
    return table


def _build_byte_table(tokenizer) -> list[bytes | None] | None:
    if not _is_byte_level(tokenizer):
        return None
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    try:
        vocab = tokenizer.get_vocab()
        added = tokenizer.get_added_vocab()
    except Exception:     # noqa: BLE001 - a tokenizer without these lists: the general path
        return None
    if any(i not in special for i in added.values()):
        return None                  # plain-text added tokens: decode() renders them its own way
    table: list[bytes | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for piece, i in vocab.items():
        if i in special:
            continue
        table[i] = _piece_bytes(piece)
        if table[i] is None:
            return None
    return table


class TokenStrings:
    """How the API shows single tokens: as text (``decode([id])``; a partial
    UTF-8 character reads as U+FFFD) and as their exact bytes (chat logprobs)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.text = lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = lru_cache(maxsize=1 << 16)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _bytes(self, token_id: int) -> list[int]:
        if token_id not in self.special_ids:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str):
                raw = _piece_bytes(piece) if self.byte_level else None
                if raw is not None:
                    return list(raw)
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):   # SentencePiece byte fallback
                    return [int(piece[3:5], 16)]
                if piece.startswith("\u2581"):          # SentencePiece word boundary
                    return list(piece.replace("\u2581", " ").encode("utf-8"))
        return list(self._text(token_id).encode("utf-8"))
