"""Which sequences run in the next engine step.

Admission is exact: a sequence's whole state is one pool slot of constant size,
so a request needing n slots starts when n slots are free, and then it can run
to its last token without ever being preempted. Requests start in arrival
order (a large-n request at the head waits rather than being overtaken forever).

Each step runs every decoding sequence once (one token each) plus prompt
segments of at most ``prefill_chunk`` tokens in total, taken in arrival order:
a long prompt is prefilled over several steps, its state carried in its slot
between segments, so the other streams get a token every step whatever the
prompt lengths.

With a prefix cache, admission also decides where each prompt's prefill
starts (after the longest stored prefix, which the engine then restores into
the slot) and where a segment must end so the state there can be stored (a
branch point shared with a recent prompt, a prefix to pin): see ``prefix_cache.py``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from statex_serve.engine.prefix_cache import PrefixCache
from statex_serve.engine.sequence import RequestState, RequestStatus, SequenceState


class SlotAllocator:
    """Free list over ``range(num_slots)``; lowest slots first (predictable, and on
    GPU it keeps the touched part of the pool small under light load)."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} slots, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self._free, slot
        self._free.append(slot)
        self._free.sort(reverse=True)


@dataclass
class PrefillChunk:
    request: RequestState
    start: int                 # prompt positions [start, end) this step
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def has_initial_state(self) -> bool:
        return self.start > 0

    @property
    def completes_prompt(self) -> bool:
        return self.end == self.request.num_prompt_tokens


@dataclass
class StepPlan:
    decode: list[tuple[RequestState, SequenceState]] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefill)


class Scheduler:
    def __init__(self, num_slots: int, prefill_chunk: int, prefix_cache: PrefixCache | None = None):
        self.slots = SlotAllocator(num_slots)
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self.waiting: deque[RequestState] = deque()
        self.running: dict[str, RequestState] = {}     # PREFILL or DECODE, in start order

    # --- membership ----------------------------------------------------------------
    def add(self, req: RequestState) -> None:
        self.waiting.append(req)

    def get(self, request_id: str) -> RequestState | None:
        req = self.running.get(request_id)
        if req is not None:
            return req
        return next((r for r in self.waiting if r.request_id == request_id), None)

    def remove(self, req: RequestState) -> None:
        """Take a request out (finished, aborted or failed) and free its slots now."""
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        elif self.running.pop(req.request_id, None) is not None:
            for slot in req.slots:
                self.slots.free(slot)
        req.status = RequestStatus.FINISHED
        self.release_prefixes(req)

    def release_prefixes(self, req: RequestState, keep_pin: bool = False) -> None:
        """Drop the request's hold on cache entries (once restored, or when it
        leaves) and, unless ``keep_pin``, on a pin reservation (idempotent)."""
        cache = self.prefix_cache
        if cache is None:
            return
        for name in ("hit", "prefix"):
            entry = getattr(req, name)
            if entry is not None:
                setattr(req, name, None)
                cache.release(entry)
        if req.pin_reserved and not keep_pin:
            req.pin_reserved = False
            cache.unreserve_pin()

    def release_sequence(self, req: RequestState, seq: SequenceState) -> None:
        """A sequence of a still-running request finished: its slot is free at once."""
        if seq.slot >= 0:
            self.slots.free(seq.slot)
            req.slots.remove(seq.slot)
            seq.slot = -1

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    # --- the step --------------------------------------------------------------------
    def admit(self, on_error=None) -> list[RequestState]:
        """Start waiting requests, in order, while their slots fit. A request
        whose planning raises is handed to ``on_error(request, exception)``
        (which must take it out) and the others go on; without it, it raises."""
        started = []
        while self.waiting and self.waiting[0].params.n <= self.slots.num_free:
            req = self.waiting.popleft()
            req.slots = self.slots.allocate(req.params.n)
            self.running[req.request_id] = req
            try:
                if self.prefix_cache is not None:
                    self._plan_prefix(req)
            except Exception as e:
                if on_error is None:
                    raise
                on_error(req, e)
                continue
            started.append(req)
        return started

    def _plan_prefix(self, req: RequestState) -> None:
        """Start after the longest stored prefix (at least one token is left to
        prefill: its logits give the first sample); end segments at a branch
        point and at a prefix to pin, so their states get stored."""
        cache, last = self.prefix_cache, req.num_prompt_tokens - 1
        limit = last
        if req.params.prompt_logprobs is not None:
            limit = req.num_prefix              # every other position's logits are needed
        if req.pin_at is not None:
            limit = min(limit, req.pin_at)
        req.hit = cache.lookup(req.token_array, limit, floor=req.prefix, scope=req.scope)
        req.num_computed = req.num_cached = req.hit.num_tokens if req.hit is not None else 0
        cuts = {req.pin_at, cache.branch_point(req.token_array, req.num_computed, last, req.scope)}
        req.cuts = sorted(c for c in cuts if c is not None and c > req.num_computed)

    def schedule(self, skip: set[str] | frozenset[str] = frozenset()) -> StepPlan:
        """The next step's work; requests in ``skip`` (paused) sit this one out."""
        plan = StepPlan()
        budget = self.prefill_chunk
        for req in self.running.values():
            if req.request_id in skip:
                continue
            if req.status is RequestStatus.DECODE:
                plan.decode.extend((req, s) for s in req.sequences if not s.finished)
            elif req.status is RequestStatus.PREFILL and budget > 0:
                take = min(req.prompt_remaining, budget)
                cut = req.next_cut()
                if cut is not None:
                    take = min(take, cut - req.num_computed)
                plan.prefill.append(PrefillChunk(req, req.num_computed, req.num_computed + take))
                budget -= take
        return plan
