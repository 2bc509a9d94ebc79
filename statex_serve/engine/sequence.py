"""The native engine's bookkeeping for one request and its n sequences.

A request is prefilled once (into the slot of sequence 0); when its prompt is
done, the state is copied to the other n-1 slots (a constant-size copy,
whatever the prompt length) and every sequence samples its own continuation.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from statex_serve.engine.base import GenerationRequest, SamplingParams, SequenceDelta, TokenLogprob
from statex_serve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from statex_serve.engine.prefix_cache import scope_bytes
from statex_serve.engine.sampler import PenaltyHistory, SamplingRow, make_generator

if TYPE_CHECKING:
    from statex_serve.engine.prefix_cache import CacheEntry, PrefixHasher


class RequestStatus(enum.Enum):
    WAITING = "waiting"        # queued for slots
    PREFILL = "prefill"        # slots held, prompt being prefilled in segments
    DECODE = "decode"          # every sequence generates one token per step
    FINISHED = "finished"


@dataclass
class SequenceState:
    """One of a request's n continuations, living in one state slot."""

    index: int
    slot: int
    params: SamplingParams
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    stop_token_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # what the next output will carry
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    pending_text: str = ""
    reported_finish: bool = False
    history: PenaltyHistory | None = None     # for penalties (None when the request uses none)
    _plain_params: bool | None = None         # plain_greedy's part that never changes (None: not known yet)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def sampling_row(self) -> SamplingRow:
        p = self.params
        banned = tuple(self.stop_token_ids) if len(self.output_ids) < p.min_tokens else ()
        return SamplingRow(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, generator=self.generator,
                           logprobs=p.logprobs, banned_token_ids=banned, logit_bias=p.logit_bias,
                           presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                           repetition_penalty=p.repetition_penalty, history=self.history)

    def plain_greedy(self) -> bool:
        """Whether this step's token is the argmax of the logits as they are, with
        nothing to report beside it and no text to look at before the next step:
        greedy, no logprobs, no biases, bans or penalties, no stop strings. (Asked
        of every row every step: what does not change is worked out once.)"""
        plain = self._plain_params
        if plain is None:
            row = self.sampling_row()
            plain = self._plain_params = (row.greedy and row.logprobs is None and not row.penalized
                                          and not row.logit_bias and not self.stops.stop)
        # stop tokens are banned until min_tokens
        return plain and not (self.stop_token_ids and len(self.output_ids) < self.params.min_tokens)

    def append(self, token_id: int, logprob: TokenLogprob | None, max_new_tokens: int) -> None:
        """Record a sampled token and decide whether the sequence ends here.

        A stop token ends it without adding its text; a stop string ends it with
        the text cut before the string; ``max_new_tokens`` ends it with "length"."""
        self.output_ids.append(token_id)
        self.pending_ids.append(token_id)
        if logprob is not None:
            self.pending_logprobs.append(logprob)
        n = len(self.output_ids)
        may_stop = n >= self.params.min_tokens
        if may_stop and token_id in self.stop_token_ids:
            matched = self.stops.add(self.detokenizer.flush(), check=True)
            self.finish("stop", matched if matched is not None
                        else (token_id if token_id in self.params.stop_token_ids else None))
            return
        new_text = self.detokenizer.add(token_id)
        if n >= max_new_tokens:
            new_text += self.detokenizer.flush()
        matched = self.stops.add(new_text, check=may_stop)
        if matched is not None:
            self.finish("stop", matched)
        elif n >= max_new_tokens:
            self.finish("length")
        else:
            self.pending_text += self.stops.release(final=False)

    def ends_with(self, token_id: int, max_new_tokens: int) -> bool | None:
        """Whether ``append(token_id, ...)`` will finish the sequence, known
        without decoding text; None when stop strings must see the text."""
        if self.stops.stop:
            return None
        n = len(self.output_ids) + 1
        return n >= max_new_tokens or (n >= self.params.min_tokens and token_id in self.stop_token_ids)

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        if self.finished:
            return
        self.finish_reason, self.stop_reason = reason, stop_reason
        if reason == "abort":
            self.stops.add(self.detokenizer.flush(), check=False)
        self.pending_text += self.stops.release(final=True)

    def take_delta(self) -> SequenceDelta | None:
        """The delta since the last call, or None when there is nothing to say."""
        report_finish = self.finished and not self.reported_finish
        if not (self.pending_ids or self.pending_text or report_finish):
            return None
        delta = SequenceDelta(
            index=self.index, text=self.pending_text, token_ids=self.pending_ids,
            logprobs=self.pending_logprobs if self.params.logprobs is not None else None,
            finish_reason=self.finish_reason if report_finish else None,
            stop_reason=self.stop_reason if report_finish else None)
        self.pending_ids, self.pending_logprobs, self.pending_text = [], [], ""
        self.reported_finish = self.reported_finish or report_finish
        return delta


@dataclass
class RequestState:
    """A request in the engine. Its prompt, as the engine sees it, is a pinned
    prefix's tokens (``prefix_id``) followed by the request's own prompt;
    positions (``num_computed``, cut points) count from the start of that."""

    request: GenerationRequest
    status: RequestStatus = RequestStatus.WAITING
    slots: list[int] = field(default_factory=list)
    num_computed: int = 0                     # prompt tokens prefilled (or restored) so far
    sequences: list[SequenceState] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    # prefix cache
    prefix: CacheEntry | None = None          # the pinned prefix it starts from (a reference, held until restored)
    hit: CacheEntry | None = None             # the stored prefix it restores (a reference, held until restored)
    pin_at: int | None = None                 # pin the state after this many tokens
    pin_reserved: bool = False                # holds a pin reservation in the cache
    prefix_id: str | None = None              # the id of the prefix pinned for it
    num_cached: int = 0                       # prompt tokens restored, not prefilled
    cuts: list[int] = field(default_factory=list)   # positions where a prefill segment must end (and snapshot)
    hasher: PrefixHasher | None = None
    queue_time: float | None = None           # seconds from arrival to its slots (set by start())
    max_new_tokens: int | None = None         # the engine's cap on generated tokens (NativeEngine._max_new_tokens)

    def __post_init__(self):
        self.scope = scope_bytes(self.request.cache_owner, self.request.cache_salt)   # mixed into its prefix keys
        own = list(self.request.prompt_token_ids)
        self.num_prefix = self.prefix.num_tokens if self.prefix is not None else 0
        self._prompt = self.prefix.prefix_tokens() + own if self.prefix is not None else own
        self._tokens: np.ndarray | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt(self) -> list[int]:
        return self._prompt

    @property
    def token_array(self) -> np.ndarray:
        """The prompt as int32 (what prefix keys hash)."""
        if self._tokens is None:
            self._tokens = np.asarray(self._prompt, dtype=np.int32)
        return self._tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self._prompt)

    @property
    def prompt_remaining(self) -> int:
        return self.num_prompt_tokens - self.num_computed

    def next_cut(self) -> int | None:
        return next((c for c in self.cuts if c > self.num_computed), None)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def start(self, slots: list[int], tokenizer, eos_token_ids: frozenset[int], device) -> None:
        """Slots granted: set up the n sequences (their slots are filled after prefill)."""
        p = self.params
        self.slots = slots
        self.status = RequestStatus.PREFILL
        self.queue_time = time.monotonic() - self.request.arrival_time
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else eos_token_ids)
        if p.prompt_logprobs is not None:     # positions restored from the prefix cache have none
            self.prompt_logprobs = [None] * (self.num_computed + 1)
        for i, slot in enumerate(slots):
            gen = None if p.greedy else make_generator(None if p.seed is None else p.seed + i, device)
            self.sequences.append(SequenceState(
                index=i, slot=slot, params=p, generator=gen,
                detokenizer=IncrementalDetokenizer(tokenizer, self.prompt, p.skip_special_tokens),
                stops=StopStringMatcher(p.stop, p.include_stop_str_in_output), stop_token_ids=stop_ids))
            if p.penalized:       # the prompt includes a pinned prefix's tokens, as vLLM's would
                self.sequences[-1].history = PenaltyHistory(self.prompt, self.sequences[-1].output_ids)
