"""The built-in engine: one loop that owns the model and the state pool.

Threads: the asyncio event loop (HTTP, streaming) never runs the model. A
dedicated engine thread does: it takes new requests and aborts from an inbox,
admits requests while state slots are free, and runs steps (see
``scheduler.py``): one decode batch for every running sequence, then prompt
segments of at most ``--prefill-chunk`` tokens. Decode results are handed to
the event loop before the step's prefill runs, so a stream's next token never
waits for someone else's prompt beyond one segment.

State: a sequence's whole context is its slot in the pool (constant size), so
admission is exact, nothing is ever preempted or swapped, and n > 1 costs one
prefill plus n - 1 slot copies.

Prefix cache (``prefix_cache.py``): where a prefill segment ends, the slot's
state is stored under the token prefix it stands for; a new request restores
the longest stored prefix of its prompt into its slot at admission and
prefills only the rest. Pinned prefixes (``pin_prefix`` / ``prefix_id``) are
the same snapshots, kept until deleted.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import AsyncIterator

import torch

from model_registry.checkpoint import load_model, read_config_dict
from model_registry.dtypes import parse_state_dtype
from statex_serve.engine import sampler as sampling
from statex_serve.engine.args import EngineArgs
from kernels.autotune import limit_autotune_search
from statex_serve.engine.compile_cache import configure_compile_cache
from statex_serve.engine.base import (
    EngineDeadError, EngineOverloadedError, EngineStats, GenerationRequest, InvalidRequestError, LoadedModelEngine,
    OutputStream, PrefixInfo, RequestFailedError, RequestOutput,
)
from statex_serve.engine.loading import (
    checkpoint_dtype, eos_token_ids, load_tokenizer, pool_slots, resolve_device, resolve_dtype,
)
from statex_serve.engine.detokenizer import byte_table
from statex_serve.engine.prefix_cache import PrefixCache, PrefixHasher
from statex_serve.engine.runner import ModelRunner
from statex_serve.engine.scheduler import PrefillChunk, Scheduler
from statex_serve.engine.sequence import RequestState, RequestStatus, SequenceState
from statex_serve.engine.step_trace import StepTrace

logger = logging.getLogger(__name__)

# fla's / mamba-ssm's prefill kernels tried at this many launch configs each with
# --autotune fast: a cold start in about a minute instead of 5+ (kernels/autotune.py)
FAST_AUTOTUNE_CONFIGS = 4

# Outputs a stream holds that its consumer has not taken. At this many the
# request is paused (the engine computes nothing more for it) until the
# consumer has taken half of them: a client that stops reading costs its slot
# and a bounded buffer, nothing else (it is aborted after --stream-stall-timeout).
STREAM_BUFFER = 32


# Engines that froze the start-up heap (NativeEngine.start); the heap is unfrozen
# when the last of them shuts down, not when the first does.
_heap_freezes = 0
_heap_lock = threading.Lock()


def _freeze_heap() -> None:
    global _heap_freezes
    with _heap_lock:
        gc.collect()
        gc.freeze()
        _heap_freezes += 1


def _unfreeze_heap() -> None:
    global _heap_freezes
    with _heap_lock:
        _heap_freezes -= 1
        if _heap_freezes == 0:
            gc.unfreeze()     # what was frozen is ordinary garbage again once no engine serves


class _OutputStream(OutputStream):
    """The stream of one request; a consumer that falls ``STREAM_BUFFER``
    outputs behind pauses the request until it has taken half of them."""

    def __init__(self, engine: NativeEngine, request_id: str):
        super().__init__()
        self._engine = engine
        self._request_id = request_id
        self._paused = False

    def _put(self, item) -> None:
        """The event loop's side of delivery: queue, and pause when too far ahead."""
        self._queue.put_nowait(item)
        if not self._paused and self._queue.qsize() >= STREAM_BUFFER:
            self._paused = True
            self._engine._pause(self._request_id, True)

    def _taken(self) -> None:
        if self._paused and self._queue.qsize() <= STREAM_BUFFER // 2:
            self._paused = False
            self._engine._pause(self._request_id, False)

    def _ended(self) -> None:
        self._engine._streams.pop(self._request_id, None)
        if self._paused:
            self._engine._pause(self._request_id, False)

    def _stop(self) -> None:
        self._engine.abort(self._request_id)


def _failed(request_id: str) -> RequestFailedError:
    # the client sees no internals; the log has the traceback under the request id
    return RequestFailedError(f"the engine failed while running request {request_id} (the server log has the "
                              "details under that id)")


class NativeEngine(LoadedModelEngine):
    def __init__(self, args: EngineArgs):
        self.args = args
        t0 = time.perf_counter()
        config = read_config_dict(args.model)
        self.device = resolve_device(args.device)
        if self.device.type == "cuda":       # before fla / mamba-ssm define their autotuners
            cache_dir = configure_compile_cache(args.compile_cache_dir)
            logger.info("compiled kernels and autotune results are kept in %s", cache_dir)
            limit_autotune_search(FAST_AUTOTUNE_CONFIGS if args.autotune == "fast" else None)
            logger.info("autotune: %s", f"{FAST_AUTOTUNE_CONFIGS} launch configs per library kernel (--autotune "
                        "full tries all: slower first start)" if args.autotune == "fast" else "full search")
        self.dtype = resolve_dtype(args.dtype, self.device, checkpoint_dtype(config))
        self.state_dtype = parse_state_dtype(args.state_dtype)
        self.model = load_model(args.model, device=self.device, dtype=self.dtype)
        self.model.fuse_projections_()
        self._tokenizer = load_tokenizer(args.tokenizer or args.model)
        byte_table(self._tokenizer)    # the detokenizer's table, built here rather than in the first request's step
        sampling.set_server_seed(args.seed)
        self.config = self.model.config
        self.spec = self.model.state_spec(self.state_dtype)
        self.num_slots = pool_slots(args, self.spec)
        self.prefill_chunk = args.prefill_chunk_for(self.device.type)
        try:
            self.runner = ModelRunner(self.model, self.num_slots, self.device, self.state_dtype,
                                      prefill_graph_tokens=self.prefill_chunk)
        except torch.OutOfMemoryError:
            raise ValueError(f"a state pool of {self.num_slots} sequences x {self.spec.bytes_per_sequence} bytes "
                             f"does not fit on {self.device}; lower --max-num-seqs or --state-memory") from None
        self._max_model_len = args.max_model_len or int(getattr(self.config, "max_position_embeddings", 0) or 8192)
        self._vocab_size = int(self.config.vocab_size)
        self.eos_token_ids = eos_token_ids(self.config, self._tokenizer)
        self.prefix_cache: PrefixCache | None = None
        if args.prefix_cache:
            free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
            device_budget, host_budget = args.prefix_cache_budgets(self.device.type, free)
            self.prefix_cache = PrefixCache(self.runner.pools, self.device, device_budget, host_budget)
        self.scheduler = Scheduler(self.num_slots, self.prefill_chunk, self.prefix_cache)
        self._log_startup(time.perf_counter() - t0)
        if self.device.type == "cuda" and args.warmup:
            self._warm_up()

        # between the event loop and the engine thread
        self._inbox: collections.deque = collections.deque()
        self._wakeup = threading.Event()
        # guards the admission bookkeeping below; held while the engine thread admits, so
        # that generate() sees slots taken and their requests gone from _pending at once
        # (re-entrant: a request whose admission fails is failed while it is held)
        self._lock = threading.RLock()
        # submitted and not yet holding slots, in arrival order: request id -> slots it needs
        self._pending: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._streams: dict[str, _OutputStream] = {}
        # a decode step launched before the host work of the step before it (see _run_decode):
        # (its batch, its logits), consumed by the next step
        self._ahead: tuple[list[tuple[RequestState, SequenceState]], torch.Tensor] | None = None
        self._run_ahead_steps = 0
        self._chained_steps = 0      # of those, launched on the device's tokens (_decode_chained)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: str | None = None
        # paused streams (their consumers stopped reading): request id -> since when (monotonic)
        self._paused: dict[str, float] = {}
        self._step_began: float | None = None      # while a step runs (the /health watchdog)
        # STATEX_STEP_TRACE=FILE: one JSON line per step (step_trace.py); off by default
        trace_path = os.environ.get("STATEX_STEP_TRACE")
        self._trace = StepTrace(trace_path) if trace_path else None
        self._no_phase = contextlib.nullcontext()
        self._froze_heap = False       # start() froze the start-up heap; shutdown() gives it back
        self._stats = EngineStats(slots_total=self.num_slots, state_bytes_per_sequence=self.spec.bytes_per_sequence,
                                  state_pool_bytes=self.runner.pools.nbytes)

    # --- the interface --------------------------------------------------------------
    @property
    def max_n(self) -> int:
        return self.num_slots

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    def unhealthy_reason(self) -> str | None:
        began = self._step_began
        if began is not None and time.monotonic() - began > self.args.step_timeout:
            return (f"an engine step has been running for {time.monotonic() - began:.0f}s (more than "
                    f"--step-timeout {self.args.step_timeout:g}s): the engine looks hung")
        return None

    def _pause(self, request_id: str, paused: bool) -> None:
        """From the event loop: a stream's consumer fell behind (or caught up)."""
        with self._lock:
            if paused:
                self._paused[request_id] = time.monotonic()
            else:
                self._paused.pop(request_id, None)
        if not paused:
            self._wakeup.set()

    def describe(self) -> dict:
        return {
            "backend": "native", "model_type": self.config.model_type, "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "state_dtype": str(self.state_dtype or torch.float32).removeprefix("torch."),
            "num_layers": self.config.num_hidden_layers,
            "expanded_layers": list(getattr(self.config, "expanded_layers", [])),
            "state_bytes_per_sequence": self.spec.bytes_per_sequence, "state_pool_slots": self.num_slots,
            "state_pool_bytes": self.runner.pools.nbytes, "max_model_len": self.max_model_len,
            "prefill_chunk": self.prefill_chunk, "cuda_graphs": self.runner.graphs is not None,
            "prefill_graph_tokens": self.runner.prefill_graphs.buckets if self.runner.prefill_graphs else None,
            "prefix_cache": None if self.prefix_cache is None else {
                "device_budget_bytes": self.prefix_cache.budget["device"],
                "host_budget_bytes": self.prefix_cache.budget["host"],
                "snapshot_bytes": self.prefix_cache.entry_bytes, "capacity": self.prefix_cache.capacity},
        }

    # --- pinned prefixes ---------------------------------------------------------------
    @property
    def supports_prefix_cache(self) -> bool:
        return True

    def _cache(self, param: str) -> PrefixCache:
        if self.prefix_cache is None:
            raise InvalidRequestError("the prefix cache is off on this server (started with --no-prefix-cache)",
                                      param, "prefix_cache_disabled")
        return self.prefix_cache

    def prefix_info(self, prefix_id: str, owner: str | None = None) -> PrefixInfo:
        return self._cache("prefix_id").info(prefix_id, owner)

    def list_prefixes(self, owner: str | None = None) -> list[PrefixInfo]:
        return [] if self.prefix_cache is None else self.prefix_cache.list_pinned(owner)

    def delete_prefix(self, prefix_id: str, owner: str | None = None) -> PrefixInfo:
        return self._cache("prefix_id").delete(prefix_id, owner)

    async def start(self) -> None:
        if self._thread is not None:
            return
        # Everything alive now (the model, the tokenizer, the captured graphs, the
        # compilers' caches) lives as long as the process: keep it out of the cyclic
        # garbage collector's full collections, which otherwise walk it all in the
        # middle of serving: ~356K objects, ~180 ms a full collection on a 2-core CPU
        # with the bundled model, under 0.1 ms frozen (scripts/host_overhead.py).
        _freeze_heap()
        self._froze_heap = True
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._engine_thread, name="statex-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 60)
        if self._trace is not None and (self._thread is None or not self._thread.is_alive()):
            self._trace.close()
        if self._froze_heap:
            self._froze_heap = False
            _unfreeze_heap()
        self._dead = self._dead or "the engine has shut down"
        for stream in list(self._streams.values()):
            stream._queue.put_nowait(EngineDeadError(self._dead))

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Check and queue ``request`` now (raises if it is refused); the stream it returns yields its outputs."""
        if self._dead is not None or self._loop is None:
            raise EngineDeadError(self._dead or "the engine has not been started")
        prefix, pin_reserved = None, False
        if request.prefix_id is not None:
            prefix = self._cache("prefix_id").acquire_pinned(request.prefix_id, request.cache_owner)  # until restored
        try:
            num_prefix = prefix.num_tokens if prefix is not None else 0
            self.check_request(request, num_prefix)
            if request.pin_prefix is not None:
                self._cache("pin_prefix").reserve_pin()
                pin_reserved = True
            req = RequestState(request, prefix=prefix, pin_reserved=pin_reserved,
                               pin_at=None if request.pin_prefix is None else num_prefix + request.pin_prefix)
            n = request.params.n
            with self._lock:
                _, waiting, demand = self._pending_split_locked()
                must_wait = waiting > 0 or demand + n > self.scheduler.slots.num_free
                if must_wait and waiting >= self.args.max_queue:
                    raise EngineOverloadedError(
                        f"the server is at capacity: all {self.num_slots} state slots are in use and "
                        f"{waiting} requests are waiting (--max-queue {self.args.max_queue}); retry shortly",
                        retry_after=1.0)
                self._pending[request.request_id] = n
        except BaseException:
            if prefix is not None:
                self.prefix_cache.release(prefix)
            if pin_reserved:
                self.prefix_cache.unreserve_pin()
            raise
        stream = _OutputStream(self, request.request_id)
        self._streams[request.request_id] = stream
        self._inbox.append(("add", req))
        self._wakeup.set()
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))
        self._wakeup.set()

    def stats(self) -> EngineStats:
        s = self._stats
        with self._lock:
            _, waiting, _ = self._pending_split_locked()
            used = self.scheduler.slots.num_used
        return EngineStats(
            running_requests=self.scheduler.num_running, waiting_requests=waiting, slots_total=self.num_slots,
            slots_used=used, state_bytes_per_sequence=s.state_bytes_per_sequence,
            state_pool_bytes=s.state_pool_bytes, prompt_tokens_total=s.prompt_tokens_total,
            generation_tokens_total=s.generation_tokens_total, requests_finished_total=s.requests_finished_total,
            requests_aborted_total=s.requests_aborted_total, steps_total=s.steps_total,
            max_prefill_tokens_per_step=s.max_prefill_tokens_per_step,
            extra={} if self.prefix_cache is None else {"prefix_cache": self.prefix_cache.stats()})

    def _pending_split_locked(self) -> tuple[int, int, int]:
        """Of the pending requests: how many start as soon as the engine looks
        (in arrival order, while free slots last), how many must wait, and the
        slots the starting ones take."""
        free = self.scheduler.slots.num_free
        starting = demand = 0
        for n in self._pending.values():
            if demand + n > free:
                break
            starting += 1
            demand += n
        return starting, len(self._pending) - starting, demand

    # --- the engine thread ------------------------------------------------------------
    def _engine_thread(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stopping:
                self._wakeup.clear()
                self._drain_inbox()
                if not self.scheduler.has_work():
                    self._wakeup.wait()
                    continue
                if not self._step():     # everything running is paused: wait for a reader (or a timeout)
                    self._wakeup.wait(0.25)
        except BaseException:       # a bug in the loop itself: fail every request, and say so
            logger.exception("the engine loop died")
            self._dead = "the engine loop died (the server log has the details)"
            self._step_began = None
            self._post([(rid, EngineDeadError(self._dead)) for rid in list(self._streams)])

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            try:
                if kind == "add":
                    self.scheduler.add(item)
                else:
                    self._abort_now(item)
            except Exception:      # one bad case costs that request, not the engine
                rid = item.request_id if kind == "add" else item
                logger.exception("engine: %s of request %s failed", kind, rid)
                req = item if kind == "add" else self.scheduler.get(rid)
                if req is not None:
                    self._fail_hard(req)
                elif rid in self._streams:
                    self._post([(rid, _failed(rid))])

    def _fail_hard(self, req: RequestState) -> None:
        """Fail a request whose bookkeeping may be half done: take it out of
        every structure it may be in, whatever state that left it in."""
        sched = self.scheduler
        if any(r is req for r in sched.waiting):
            sched.waiting = collections.deque(r for r in sched.waiting if r is not req)
        held = sched.running.get(req.request_id) is req
        if held:
            del sched.running[req.request_id]
            for slot in req.slots:
                with contextlib.suppress(Exception):
                    sched.slots.free(slot)
        req.status = RequestStatus.FINISHED
        with contextlib.suppress(Exception):
            sched.release_prefixes(req)
        with self._lock:
            self._pending.pop(req.request_id, None)
            self._paused.pop(req.request_id, None)
        self._post([(req.request_id, _failed(req.request_id))])

    def _abort_stalled(self) -> set[str]:
        """Abort streams paused longer than --stream-stall-timeout; the ids still paused."""
        with self._lock:
            paused = dict(self._paused)
        now, limit = time.monotonic(), self.args.stream_stall_timeout
        for rid, since in paused.items():
            if now - since > limit:
                logger.warning("request %s: its client has read nothing for %.0fs (--stream-stall-timeout); "
                               "aborting it", rid, now - since)
                with self._lock:
                    self._paused.pop(rid, None)
                self._abort_now(rid)
        return {rid for rid, since in paused.items() if now - since <= limit}

    def _abort_now(self, request_id: str) -> None:
        req = self.scheduler.get(request_id)
        if req is None:
            return
        for seq in req.sequences:
            seq.finish("abort")
        self.scheduler.remove(req)
        with self._lock:
            self._pending.pop(request_id, None)
        self._stats.requests_aborted_total += 1
        if request_id in self._streams:   # aborted through the API while someone still listens
            self._post([(request_id, self._output(req, finished=True))])

    def _step(self) -> bool:
        """One step; False when there was nothing to run."""
        self._step_began = time.monotonic()
        try:
            return self._run_step()
        finally:
            self._step_began = None

    def _run_step(self) -> bool:
        trace = self._trace
        if trace is not None:
            trace.begin()
        with self._phase("admit"):
            with self._lock:
                started = self.scheduler.admit(on_error=self._admission_failed)
                for req in started:
                    self._pending.pop(req.request_id, None)
            for req in started:          # one at a time: a restore that fails costs only its request
                self._guarded([req], self._start_requests, [req])
            paused = self._abort_stalled() if self._paused else set()
            plan = self.scheduler.schedule(skip=paused)
        if plan.empty and self._ahead is None:
            if trace is not None:
                trace.current = None
            return bool(started)
        self._stats.steps_total += 1
        self._stats.max_prefill_tokens_per_step = max(self._stats.max_prefill_tokens_per_step,
                                                      plan.num_prefill_tokens)
        tokens_before = self._stats.generation_tokens_total
        if plan.decode or self._ahead is not None:
            decoding = plan.decode or self._ahead[0]
            with self._phase("decode"):
                self._guarded({r.request_id: r for r, _ in decoding}.values(), self._run_decode, plan.decode)
        decode_rows = self._stats.generation_tokens_total - tokens_before     # the rows the decode step ran
        if plan.prefill:
            with self._phase("prefill"):
                self._guarded([c.request for c in plan.prefill], self._run_prefill, plan.prefill)
        if trace is not None:
            trace.end(decode_rows=decode_rows, prefill_segments=len(plan.prefill),
                      prefill_tokens=plan.num_prefill_tokens, admitted=len(started),
                      launched_ahead=self._ahead is not None)
        return True

    def _phase(self, name: str):
        """A timed phase of the step in the step trace (a no-op without one)."""
        return self._no_phase if self._trace is None else self._trace.phase(name)

    def _admission_failed(self, req: RequestState, err: Exception) -> None:
        logger.error("engine: admitting request %s failed", req.request_id, exc_info=err)
        self._fail_hard(req)

    def _start_requests(self, started: list[RequestState]) -> None:
        for req in started:
            req.start(req.slots, self._tokenizer, self.eos_token_ids, self.device)
            if req.hit is not None:       # the longest stored prefix (planned at admission)
                self.prefix_cache.restore(req.hit, req.slots[0])
                if req.pin_at == req.num_computed:     # the prefix to pin is the one just restored
                    self.prefix_cache.pin(req.hit)
                    req.prefix_id, req.pin_reserved = req.hit.id, False
            self.scheduler.release_prefixes(req, keep_pin=True)

    def _guarded(self, requests, fn, arg) -> None:
        """Run one phase; if it raises, fail only the requests in it and go on."""
        try:
            fn(arg)
        except Exception:
            requests = list(requests)
            logger.exception("engine step failed; failing %d request(s): %s", len(requests),
                             ", ".join(r.request_id for r in requests))
            self._fail(requests)

    def _fail(self, requests, err: Exception | None = None) -> None:
        """Fail requests with ``err`` (default: "the engine failed", naming each request)."""
        posts = []
        for req in requests:
            if req.finished:
                continue
            self.scheduler.remove(req)
            posts.append((req.request_id, err if err is not None else _failed(req.request_id)))
        self._post(posts)

    def _max_new_tokens(self, req: RequestState) -> int:
        cap = req.max_new_tokens      # asked for every row every step: worked out once
        if cap is None:
            cap = req.max_new_tokens = min(req.params.max_tokens, self._max_model_len - req.num_prompt_tokens)
        return cap

    def _sample(self, logits: torch.Tensor, batch: list[tuple[RequestState, SequenceState]]):
        """Sample every row; if the batch fails, each row alone, failing only the
        requests whose rows fail. Yields (request, sequence, token, logprob)."""
        try:
            t0 = time.perf_counter()
            sampled = sampling.sample(logits, [s.sampling_row() for _, s in batch])
            if self._trace is not None:
                self._trace.add("wait_ms", (time.perf_counter() - t0) * 1e3)
            yield from ((r, s, t, lp) for (r, s), t, lp in zip(batch, sampled.token_ids, sampled.logprobs))
            return
        except Exception:
            logger.exception("engine: sampling a batch of %d failed; sampling its rows one by one", len(batch))
        bad: dict[str, RequestState] = {}
        for i, (req, seq) in enumerate(batch):
            if req.request_id in bad:
                continue
            try:
                one = sampling.sample(logits[i:i + 1], [seq.sampling_row()])
            except Exception:
                logger.exception("engine: sampling for request %s failed", req.request_id)
                bad[req.request_id] = req
                continue
            yield req, seq, one.token_ids[0], one.logprobs[0]
        self._fail(bad.values())

    def _run_decode(self, batch: list[tuple[RequestState, SequenceState]]) -> None:
        """One token for every decoding sequence, in three steps:

        1. the step's logits: launched now, or already launched by the step
           before (run-ahead, below); sample them (the one host sync);
        2. run ahead: when only decoding is going on, launch the next step for
           the sequences that go on (their next input is the token just
           sampled, and whether a token ends a sequence is known without its
           text) before the host work of this one, so the GPU computes while
           the host detokenizes and hands tokens out;
        3. record the tokens: text, stop strings, results to the event loop.
        """
        ahead, self._ahead = self._ahead, None
        keep = [] if ahead is None else [i for i, (req, seq) in enumerate(ahead[0])
                                         if not (req.finished or seq.finished)]
        if keep:
            # the launched batch, less what was aborted or failed since (sequences that
            # began decoding since then wait one step)
            batch = [ahead[0][i] for i in keep]
            logits = ahead[1] if len(keep) == len(ahead[0]) else ahead[1][keep]
        else:
            if not batch:
                return
            logits = self.runner.decode([s.last_token for _, s in batch], [s.slot for _, s in batch])
        if self._may_run_ahead() and all(seq.plain_greedy() for _, seq in batch):
            self._decode_chained(batch, logits)
            return
        # (request, sequence, token, logprob) of the rows that sampled; a request whose
        # row failed is failed alone (_sample)
        rows = [(req, seq, tok, lp, self._max_new_tokens(req))
                for req, seq, tok, lp in self._sample(logits, batch) if not req.finished]
        recorded: set[int] = set()
        if self._may_run_ahead():
            go_on = []
            for i, (req, seq, tok, lp, max_new) in enumerate(rows):
                ends = seq.ends_with(tok, max_new)
                if ends is None:          # stop strings: the text decides, so record it now
                    seq.append(tok, lp, max_new)
                    recorded.add(i)
                    ends = seq.finished
                if not ends:
                    go_on.append(((req, seq), tok))
            if go_on:
                self._run_ahead_steps += 1
                self._ahead = ([rs for rs, _ in go_on],
                               self.runner.decode([t for _, t in go_on], [seq.slot for (_, seq), _ in go_on]))
        touched: dict[str, RequestState] = {}
        for i, (req, seq, tok, lp, max_new) in enumerate(rows):
            if i not in recorded:
                seq.append(tok, lp, max_new)
            touched[req.request_id] = req
        self._stats.generation_tokens_total += len(batch)
        self._emit(touched.values())

    def _decode_chained(self, batch: list[tuple[RequestState, SequenceState]], logits: torch.Tensor) -> None:
        """Run-ahead without a host round trip, for plain greedy rows: the next
        step is launched on this step's argmax where it lies, on the device,
        before the host has read the tokens, so the GPU goes from one step to
        the next with no gap (the host's sampling, copies and launch used to sit
        between them: ~0.1 ms a token at one stream). Whether a sequence ends
        by length is known beforehand; one that ends on a stop token this step
        has had the next step computed for nothing, which its next step drops
        (``keep`` above). Its slot is written once more, before anything queued
        after it on the stream can reuse the slot."""
        tokens, read_tokens = self.runner.argmax_to_host(logits)
        go_on = [i for i, (req, seq) in enumerate(batch)
                 if not req.finished and len(seq.output_ids) + 1 < self._max_new_tokens(req)]
        if go_on:
            ids = tokens if len(go_on) == len(batch) else tokens[torch.tensor(go_on, device=tokens.device)]
            self._run_ahead_steps += 1
            self._chained_steps += 1
            self._ahead = ([batch[i] for i in go_on], self.runner.decode(ids, [batch[i][1].slot for i in go_on]))
        touched: dict[str, RequestState] = {}
        t0 = time.perf_counter()
        tokens_read = read_tokens()
        if self._trace is not None:
            self._trace.add("wait_ms", (time.perf_counter() - t0) * 1e3)
        for (req, seq), tok in zip(batch, tokens_read):
            if req.finished:
                continue
            seq.append(tok, None, self._max_new_tokens(req))
            touched[req.request_id] = req
        self._stats.generation_tokens_total += len(batch)
        self._emit(touched.values())

    def _may_run_ahead(self) -> bool:
        """Only in steady decoding: nothing waits, nothing is being prefilled, no
        request or abort is in the inbox (each would change the next batch)."""
        if not self.args.run_ahead or self._inbox or self._stopping or self.scheduler.waiting or self._paused:
            return False
        return all(r.status is RequestStatus.DECODE for r in self.scheduler.running.values())

    def _run_prefill(self, chunks: list[PrefillChunk]) -> None:
        all_logits = any(c.request.params.prompt_logprobs is not None for c in chunks)
        ids: list[int] = []
        for c in chunks:
            ids.extend(c.request.prompt[c.start:c.end])
        logits = self.runner.prefill(ids, [c.num_tokens for c in chunks], [c.request.slots[0] for c in chunks],
                                     [c.has_initial_state for c in chunks], all_logits=all_logits)
        if self.prefix_cache is not None:    # before sampling: a request that ends now frees its slot
            failed = [c.request for c in chunks if not self._store_prefix(c)]
            if failed:
                self._fail(failed, InvalidRequestError(
                    "the prefix could not be pinned: the prefix cache is full of pinned prefixes and prefixes "
                    "in use; delete some with DELETE /v1/prefixes/{id}", "pin_prefix", "prefix_store_full"))
        done: list[tuple[RequestState, torch.Tensor]] = []
        offset = 0
        for i, c in enumerate(chunks):
            req = c.request
            rows = logits[offset:offset + c.num_tokens] if all_logits else logits[i:i + 1]
            offset += c.num_tokens
            if req.finished:         # failed above (a pin that could not be kept)
                continue
            k = req.params.prompt_logprobs
            if k is not None:   # row j predicts prompt[start + j + 1]
                targets = req.prompt[c.start + 1:min(c.end + 1, req.num_prompt_tokens)]
                req.prompt_logprobs.extend(sampling.prompt_logprobs(rows, targets, k))
            req.num_computed = c.end
            self._stats.prompt_tokens_total += c.num_tokens
            if c.completes_prompt:
                done.append((req, rows[-1]))
        if done:
            self._start_decoding(done)

    def _start_decoding(self, done: list[tuple[RequestState, torch.Tensor]]) -> None:
        """Prompts complete: copy the state to the other n - 1 slots, sample every
        sequence's first token from the prompt's last logits."""
        rows, seqs = [], []
        for req, last_logits in done:
            req.status = RequestStatus.DECODE
            first = req.sequences[0]
            if self._max_new_tokens(req) <= 0:       # scoring only (echo with max_tokens=0)
                for seq in req.sequences:
                    seq.finish("length")
                continue
            for seq in req.sequences:
                if seq is not first:
                    self.runner.copy_state(first.slot, seq.slot)
                rows.append(last_logits)
                seqs.append((req, seq))
        if seqs:
            for req, seq, tok, lp in self._sample(torch.stack(rows), seqs):
                if req.finished:
                    continue
                seq.append(tok, lp, self._max_new_tokens(req))
            self._stats.generation_tokens_total += len(seqs)
        self._emit(req for req, _ in done)

    def _store_prefix(self, c: PrefillChunk) -> bool:
        """Store the state after the segment; pin it when it ends the prefix to
        pin. False only when a pin could not be kept."""
        req = c.request
        if req.hasher is None:
            req.hasher = PrefixHasher(req.token_array, req.scope)
        pin = req.pin_at == c.end
        entry = self.prefix_cache.store(req.hasher.key(c.end), c.end, req.token_array, req.slots[0], pin=pin,
                                        scope=req.scope, owner=req.request.cache_owner)
        if pin:
            req.pin_reserved = False
            if entry is None:
                return False
            req.prefix_id = entry.id
        return True

    # --- results to the event loop ------------------------------------------------------
    def _output(self, req: RequestState, finished: bool) -> RequestOutput:
        deltas = [d for d in (s.take_delta() for s in req.sequences) if d is not None]
        out = RequestOutput(req.request_id, deltas, finished, req.num_prompt_tokens,
                            num_cached_tokens=req.num_cached, prefix_id=req.prefix_id, queue_time=req.queue_time)
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            out.prompt_logprobs = req.prompt_logprobs[req.num_prefix:]   # the request's own prompt
            if req.num_prefix:
                out.prompt_logprobs[0] = None
            req.prompt_logprobs_sent = True
        return out

    def _emit(self, requests) -> None:
        posts = []
        for req in requests:
            if req.finished:
                continue
            finished = all(s.finished for s in req.sequences)
            if finished:
                self.scheduler.remove(req)
                self._stats.requests_finished_total += 1
            else:
                for seq in req.sequences:
                    if seq.finished and seq.slot >= 0:
                        self.scheduler.release_sequence(req, seq)
            out = self._output(req, finished)
            if out.outputs or finished:
                posts.append((req.request_id, out))
        self._post(posts)

    def _post(self, items: list[tuple[str, object]]) -> None:
        if not items or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:     # the event loop is closed: nobody is listening any more
            pass

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream._put(item)

    def _warm_up(self) -> None:
        """Before serving: compile and autotune every kernel variant a request can
        reach (the decode graphs were captured with the runner), so that no
        request pays for it; each stage logs its time."""
        t0 = time.perf_counter()
        logger.info("warm-up: prefill variants (compiles and autotunes on a cold cache: minutes)...")
        calls = self.runner.warm_up_prefill(self.prefill_chunk, self._vocab_size)
        t1 = time.perf_counter()
        logger.info("warm-up: %d prefill calls in %.1fs", calls, t1 - t0)
        logits = torch.randn(4, self._vocab_size, device=self.device)
        rows = [sampling.SamplingRow(), sampling.SamplingRow(logprobs=5),
                sampling.SamplingRow(temperature=0.7, top_p=0.9, generator=sampling.make_generator(0, self.device)),
                sampling.SamplingRow(temperature=1.0, top_k=20, generator=sampling.make_generator(1, self.device))]
        sampling.sample(logits, rows)
        sampling.prompt_logprobs(logits, [1, 2, 3], 5)
        torch.cuda.synchronize(self.device)
        logger.info("warm-up: sampler in %.1fs; ready", time.perf_counter() - t1)

    def _log_startup(self, seconds: float) -> None:
        cfg = self.config
        expanded = list(getattr(cfg, "expanded_layers", []))
        logger.info("model %s: %s, %d layers (expanded: %s), %s on %s, loaded in %.1fs", self.args.model,
                    cfg.model_type, cfg.num_hidden_layers, expanded or "none", str(self.dtype).removeprefix("torch."),
                    self.device, seconds)
        if self.device.type == "cpu":
            # tiny models are latency-bound: OMP_NUM_THREADS=1 is often faster on a busy machine
            logger.info("torch intra-op threads: %d (set OMP_NUM_THREADS to change)", torch.get_num_threads())
        logger.info("state: %d bytes per sequence (%s)", self.spec.bytes_per_sequence, self.spec.summary())
        logger.info("state pool: %d sequences, %d bytes (%.1f MiB)%s; prefill chunk %d tokens; max model len %d",
                    self.num_slots, self.runner.pools.nbytes, self.runner.pools.nbytes / 2**20,
                    f" from --state-memory {self.args.state_memory} bytes" if self.args.state_memory else "",
                    self.prefill_chunk, self._max_model_len)
        cache = self.prefix_cache
        if cache is None:
            logger.info("prefix cache: off")
        else:
            logger.info("prefix cache: %.1f MiB on %s + %.1f MiB host = %d snapshots of %d bytes",
                        cache.budget["device"] / 2**20, self.device, cache.budget["host"] / 2**20, cache.capacity,
                        cache.entry_bytes)
            if cache.capacity == 0:
                logger.warning("prefix cache: the budgets hold no snapshot; nothing will be cached")
