"""``--backend vllm``: the engine interface over vLLM's ``AsyncLLM`` (vLLM
schedules, batches and samples; text, stop strings and admission are ours).
How our arguments map onto vLLM's, and why: docs/vllm.md, "Our API over vLLM".
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from model_registry.checkpoint import read_config_dict
from model_registry.dtypes import dtype_name, parse_state_dtype
from statex_serve.engine.args import EngineArgs
from statex_serve.engine.base import (
    MAX_N, EngineDeadError, EngineOverloadedError, EngineStats, GenerationRequest, InvalidRequestError,
    LoadedModelEngine, OutputStream, RequestFailedError, RequestOutput, SamplingParams, TokenLogprob,
)
from statex_serve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from statex_serve.engine.loading import (checkpoint_dtype, eos_token_ids, load_tokenizer, resolve_device,
                                         resolve_dtype)
from statex_serve.engine.prefix_cache import scope_bytes
from statex_serve.engine.sequence import SequenceState

logger = logging.getLogger(__name__)

ENGINE_ARGS_ENV = "STATEX_VLLM_ENGINE_ARGS"


def _state_spec(config: dict, state_dtype: str, dtype: torch.dtype):
    from model_registry import MODEL_TYPES
    from model_registry.vllm_plugin import FlaGLAConfig

    mt = config.get("model_type")
    cls = MODEL_TYPES[mt][0] if mt in MODEL_TYPES else (FlaGLAConfig if mt == "gla" else None)
    if cls is None:
        raise ValueError(f"model_type {mt!r} is not served by the StateX vLLM plugin "
                         f"(statex_gla, statex_mamba2, gla)")
    cfg = cls.from_dict(config)
    return cfg, cfg.state_spec(parse_state_dtype(state_dtype), conv_dtype=dtype)


def _top(position, k: int) -> list[tuple[int, float]]:
    ranked = sorted(position.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30))
    return [(int(t), float(lp.logprob)) for t, lp in ranked if lp.rank is not None and lp.rank <= k][:k]


def _token_logprob(token_id: int, position, k: int) -> TokenLogprob:
    lp = position.get(token_id)
    return TokenLogprob(int(token_id), float(lp.logprob) if lp is not None else float("-inf"), _top(position, k))


class _Stream(OutputStream):
    """What ``generate`` returns. Each of the n sequences is one vLLM request
    (seed + i, as in the native engine) driven by a pump task; vLLM samples
    (``detokenize=False``) and our ``SequenceState`` turns tokens into text and
    applies stop strings, ending that vLLM request when one matches. Leaving
    early (``aclose``, cancellation, dropping the stream) aborts them all."""

    # one sequence's failure ends the request: the other pumps stop too
    abort_on_error = True

    def __init__(self, engine: VLLMEngine, request: GenerationRequest):
        super().__init__()
        self._engine = engine
        self._request = request
        p = request.params
        self._ready = p.prompt_logprobs is None       # hold outputs until the prompt logprobs are in
        self._first_sent = False
        self._prompt_logprobs = None
        self._cached = 0
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else engine.eos_token_ids)
        self.seqs = [SequenceState(index=i, slot=-1, params=p, generator=None,
                                   detokenizer=IncrementalDetokenizer(engine.tokenizer, request.prompt_token_ids,
                                                                      p.skip_special_tokens),
                                   stops=StopStringMatcher(p.stop, p.include_stop_str_in_output),
                                   stop_token_ids=stop_ids)
                     for i in range(p.n)]
        self.vllm_ids = [request.request_id if p.n == 1 else f"{request.request_id}#{i}" for i in range(p.n)]
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pump(i, engine._vllm_params(p, i, stop_ids))) for i in range(p.n)]

    async def _pump(self, i: int, vllm_params) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMDeadError

        e = self._engine
        prompt = {"prompt_token_ids": self._request.prompt_token_ids}
        salt = scope_bytes(self._request.cache_owner, self._request.cache_salt)
        if salt:        # vLLM's own cache_salt: prefix-cache hits only within the scope
            prompt["cache_salt"] = salt.hex()
        gen = e._llm.generate(prompt, vllm_params, self.vllm_ids[i])
        try:
            async for out in gen:
                self._on_output(i, out)
                if self.seqs[i].finished:
                    break                  # a stop string matched: closing the generator aborts in vLLM
        except asyncio.CancelledError:
            raise
        except VLLMDeadError as err:
            e._dead = f"the vLLM engine died: {err}"
            self._queue.put_nowait(EngineDeadError(e._dead))
        except Exception:              # noqa: BLE001 - handed to the consumer
            logger.exception("request %s failed in vLLM", self._request.request_id)
            self._queue.put_nowait(RequestFailedError(      # the client sees no internals; the log has them
                f"the engine failed while running request {self._request.request_id} (the server log has the "
                "details under that id)"))
        finally:
            await gen.aclose()
            if all(t.done() or t is asyncio.current_task() for t in self._tasks):
                e._release(self._request.request_id)

    def _on_output(self, i: int, out) -> None:
        p = self._request.params
        seq = self.seqs[i]
        c = out.outputs[0]
        ids = list(c.token_ids)
        positions = list(c.logprobs) if (p.logprobs is not None and c.logprobs is not None) else None
        for j, tok in enumerate(ids):
            if seq.finished:
                break
            lp = _token_logprob(tok, positions[j], p.logprobs) if positions is not None else None
            seq.append(int(tok), lp, p.max_tokens)
            self._engine._stats.generation_tokens_total += 1
        if out.finished and not seq.finished:
            # vLLM ended it (an abort, or a limit our bookkeeping did not see)
            seq.finish(c.finish_reason or "stop", c.stop_reason)
        if i == 0 and not self._first_sent and not self._ready:
            if p.prompt_logprobs is not None and out.prompt_logprobs is not None:
                prompt = self._request.prompt_token_ids
                self._prompt_logprobs = [None] + [_token_logprob(t, pos, p.prompt_logprobs)
                                                  for t, pos in zip(prompt[1:], list(out.prompt_logprobs)[1:])]
            self._ready = True
        if i == 0 and out.num_cached_tokens:
            self._cached = int(out.num_cached_tokens)
        if self._ready:
            self._emit()

    def _emit(self) -> None:
        deltas = [d for d in (s.take_delta() for s in self.seqs) if d is not None]
        finished = all(s.reported_finish for s in self.seqs)
        if not deltas and not finished and self._first_sent:
            return
        e = self._engine
        if not self._first_sent:
            e._stats.prompt_tokens_total += len(self._request.prompt_token_ids) - self._cached
            e._stats.extra["cached"] = e._stats.extra.get("cached", 0) + self._cached
        if finished:
            if any(s.finish_reason == "abort" for s in self.seqs):
                e._stats.requests_aborted_total += 1
            else:
                e._stats.requests_finished_total += 1
        self._queue.put_nowait(RequestOutput(
            request_id=self._request.request_id, outputs=deltas, finished=finished,
            num_prompt_tokens=len(self._request.prompt_token_ids),
            prompt_logprobs=self._prompt_logprobs if not self._first_sent else None,
            num_cached_tokens=self._cached))
        self._first_sent = True

    def abort(self) -> None:
        """Abort every sequence's vLLM request; the stream ends with an "abort" output."""
        loop = self._tasks[0].get_loop()

        async def _abort():
            await self._engine._llm.abort([vid for vid, s in zip(self.vllm_ids, self.seqs) if not s.finished])

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(_abort())
        else:
            asyncio.run_coroutine_threadsafe(_abort(), loop)

    def _stop(self) -> None:
        for t in self._tasks:
            if not t.done():
                t.cancel()                 # vLLM's generate() aborts a request when cancelled


class VLLMEngine(LoadedModelEngine):
    def __init__(self, args: EngineArgs):
        args = args.with_default_max_model_len()
        self.args = args
        t0 = time.perf_counter()
        import vllm  # noqa: F401  (a clear error when vLLM is missing)

        from model_registry.vllm_plugin import register

        register()      # the entry point does this in vLLM's processes; this process needs it too
        config = read_config_dict(args.model)
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device, checkpoint_dtype(config))
        self.config, self.spec = _state_spec(config, args.state_dtype, self.dtype)
        self._tokenizer = load_tokenizer(args.tokenizer or args.model)
        self.eos_token_ids = eos_token_ids(self.config, self._tokenizer)
        self._vocab_size = int(config["vocab_size"])
        self._max_model_len = args.max_model_len

        per_seq = self.spec.bytes_per_sequence
        pages_per_seq = 2 if args.prefix_cache else 1          # 'align' mode keeps a checkpoint page
        if args.state_memory is not None:
            fits = args.state_memory // (per_seq * pages_per_seq)
            if fits < 1:
                raise ValueError(f"--state-memory {args.state_memory} bytes holds no sequence: one sequence "
                                 f"needs {per_seq * pages_per_seq} bytes in vLLM ({self.spec.summary()})")
            self.max_num_seqs = min(fits, args.max_num_seqs or fits)
            budget = args.state_memory
        else:
            self.max_num_seqs = args.max_num_seqs or EngineArgs.DEFAULT_MAX_NUM_SEQS
            budget = self.max_num_seqs * per_seq * pages_per_seq
        self.state_budget = budget
        extra = dict(args.vllm_args or {})
        extra.update(json.loads(os.environ.get(ENGINE_ARGS_ENV, "{}") or "{}"))
        kw: dict[str, Any] = dict(
            model=str(args.model), served_model_name=list(args.served_model_names) or None,
            dtype=dtype_name(self.dtype), max_model_len=self._max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_seqs + args.prefill_chunk_for(self.device.type),
            enable_prefix_caching=bool(args.prefix_cache), enable_chunked_prefill=True,
            disable_log_stats=True, enable_log_requests=False, max_logprobs=args.max_logprobs,
        )
        if args.tokenizer is not None:
            kw["tokenizer"] = str(args.tokenizer)
        if args.seed is not None:
            kw["seed"] = args.seed
        if args.state_dtype != "auto":
            kw["mamba_ssm_cache_dtype"] = dtype_name(parse_state_dtype(args.state_dtype))
        kw["kv_cache_memory_bytes"] = budget
        if args.max_model_len > int(config.get("max_position_embeddings") or 0):
            # recurrent models have no position limit; vLLM checks max_position_embeddings
            os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
        kw.update(extra)
        self.vllm_kwargs = kw

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
        except Exception as e:
            raise RuntimeError(f"vLLM could not start {args.model}: {type(e).__name__}: {e}") from e
        cache = self._llm.vllm_config.cache_config
        self.num_blocks = int(cache.num_gpu_blocks or 0)
        self.page_bytes = per_seq
        self._streams: dict[str, _Stream] = {}
        self._inflight: dict[str, int] = {}         # request id -> sequences (n)
        self._dead: str | None = None
        self._started = False
        self._stats = EngineStats(slots_total=self.max_num_seqs, state_bytes_per_sequence=per_seq,
                                  state_pool_bytes=self.num_blocks * per_seq)
        logger.info("vLLM engine ready in %.1fs: %s on %s, %s; state %s; %d sequences (vLLM state blocks: %d)",
                    time.perf_counter() - t0, args.model, self.device, kw["dtype"], self.spec.summary(),
                    self.max_num_seqs, self.num_blocks)

    # --- the interface --------------------------------------------------------------
    @property
    def max_n(self) -> int:
        return min(MAX_N, self.max_num_seqs)

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._started and self._llm is not None and not self._llm.errored

    def describe(self) -> dict:
        import vllm

        return {
            "backend": "vllm", "vllm_version": vllm.__version__, "model_type": self.config.model_type,
            "device": str(self.device), "dtype": self.vllm_kwargs["dtype"],
            "num_layers": self.config.num_hidden_layers,
            "expanded_layers": list(getattr(self.config, "expanded_layers", [])),
            "state_bytes_per_sequence": self.spec.bytes_per_sequence, "max_num_seqs": self.max_num_seqs,
            "vllm_state_blocks": self.num_blocks, "prefix_caching": bool(self.args.prefix_cache),
            "tensor_parallel_size": self._llm.vllm_config.parallel_config.tensor_parallel_size,
            "max_model_len": self.max_model_len, "max_num_batched_tokens": self.vllm_kwargs["max_num_batched_tokens"],
        }

    async def start(self) -> None:
        self._started = True

    async def shutdown(self) -> None:
        self._dead = self._dead or "the engine has shut down"
        for stream in list(self._streams.values()):
            stream._stop()
            stream._queue.put_nowait(EngineDeadError(self._dead))
        if self._llm is not None:
            # collected now rather than at interpreter exit, where AsyncLLM.__del__ fails
            llm, self._llm = self._llm, None
            llm.shutdown()
            del llm
            gc.collect()

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if self._dead is not None or not self._started:
            raise EngineDeadError(self._dead or "the engine has not been started")
        if self._llm.errored:
            self._dead = f"the vLLM engine died: {self._llm.dead_error}"
            raise EngineDeadError(self._dead)
        self.check_request(request)
        n = request.params.n
        waiting = max(0, sum(self._inflight.values()) - self.max_num_seqs)
        if sum(self._inflight.values()) + n > self.max_num_seqs and waiting >= self.args.max_queue:
            raise EngineOverloadedError(
                f"the server is at capacity: {self.max_num_seqs} sequences are running and {waiting} are "
                f"waiting (--max-queue {self.args.max_queue}); retry shortly", retry_after=1.0)
        self._inflight[request.request_id] = n
        stream = _Stream(self, request)
        self._streams[request.request_id] = stream
        return stream

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.abort()

    def stats(self) -> EngineStats:
        s = self._stats
        running = sum(self._inflight.values())
        return EngineStats(
            running_requests=min(running, self.max_num_seqs), waiting_requests=max(0, running - self.max_num_seqs),
            slots_total=self.max_num_seqs, slots_used=min(running, self.max_num_seqs),
            state_bytes_per_sequence=s.state_bytes_per_sequence, state_pool_bytes=s.state_pool_bytes,
            prompt_tokens_total=s.prompt_tokens_total, generation_tokens_total=s.generation_tokens_total,
            requests_finished_total=s.requests_finished_total, requests_aborted_total=s.requests_aborted_total,
            extra={"backend": "vllm", "prompt_tokens_cached_total": s.extra.get("cached", 0)})

    # --- helpers ----------------------------------------------------------------------
    def _refuse_unsupported(self, request: GenerationRequest) -> None:
        if request.prefix_id is not None or request.pin_prefix is not None:
            raise InvalidRequestError("pinned prefixes are not available with --backend vllm (vLLM caches "
                                      "prompt prefixes automatically)", "prefix_id")

    def _refuse_beyond_limits(self, request: GenerationRequest) -> None:
        p = request.params
        if p.max_tokens == 0:
            raise InvalidRequestError("max_tokens=0 (prompt scoring) is not available with --backend vllm",
                                      "max_tokens")
        step_tokens = self.vllm_kwargs["max_num_batched_tokens"] - self.max_num_seqs
        long_prompt = len(request.prompt_token_ids) > step_tokens
        if self.device.type == "cpu" and p.seed is not None and not p.greedy and long_prompt:
            # vLLM 0.32's CPU runner rewinds a seeded generator after a partial prefill with
            # set_offset, which CPU generators lack: the engine core dies, failing everyone
            raise InvalidRequestError(
                f"a seed with a prompt longer than {step_tokens} tokens (one prefill step) is not available "
                "with --backend vllm on CPU (vLLM's CPU sampler cannot resume a seeded generator across prefill "
                "steps); omit the seed, raise --prefill-chunk, or use the native backend", "seed")

    def _vllm_params(self, p: SamplingParams, index: int, stop_ids: frozenset[int]):
        """vLLM's params for sequence ``index`` of a request: vLLM samples and stops
        on tokens and lengths; text and stop strings are ours (``SequenceState``)."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VSamplingParams(
            n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k > 0 else 0,
            min_tokens=p.min_tokens, max_tokens=p.max_tokens, seed=None if p.seed is None else p.seed + index,
            stop_token_ids=sorted(stop_ids) or None, ignore_eos=p.ignore_eos,
            logit_bias=dict(p.logit_bias) or None, logprobs=p.logprobs,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            prompt_logprobs=p.prompt_logprobs if index == 0 else None,
            detokenize=False, output_kind=RequestOutputKind.DELTA)

    def _release(self, request_id: str) -> None:
        self._inflight.pop(request_id, None)
        self._streams.pop(request_id, None)
