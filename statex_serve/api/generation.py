"""The one request pipeline behind /v1/completions and /v1/chat/completions
(``GenerationEndpoint``: checks, prompt ids, sampling params, engine requests)
and the answer it builds (``InFlightRequest``: collected whole or streamed as
server-sent events). ``completions.py`` and ``chat.py`` supply only what
OpenAI's two formats make differ. Also here: the request checks both share,
running several engine requests as one merged stream, and noticing a client
that went away."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from statex_serve.api.errors import APIError, from_engine_error, sse_error
from statex_serve.api.metrics import Metrics, SequenceTimer
from statex_serve.api.schemas import _GenerationFields
from statex_serve.engine.base import (
    Engine, EngineError, GenerationRequest, RequestOutput, SamplingParams, SequenceDelta, TokenLogprob,
    context_length_message, requested_tokens,
)
from statex_serve.engine.detokenizer import TokenStrings

logger = logging.getLogger(__name__)

_END = object()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(engine: Engine, name: str | None) -> None:
    if name is not None and name not in engine.served_model_names:
        raise APIError(404, f"The model `{name}` does not exist. This server serves "
                            f"{', '.join(repr(n) for n in engine.served_model_names)}.",
                       "model", "model_not_found")


def check_supported(body: _GenerationFields) -> None:
    problem = body.unsupported()
    if problem is not None:
        raise APIError(400, problem[1], problem[0], "unsupported_parameter")
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        logger.warning("ignoring unknown request fields: %s", ", ".join(extra))


def max_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` stands for (its longest
    vocabulary entry: a byte-level piece has one character per byte, a
    SentencePiece piece one per character), so a text of c characters is at
    least c / this many tokens."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:     # noqa: BLE001 - a tokenizer without a vocabulary list: no bound
        return 0
    return max((len(t) for t in vocab), default=0)


def check_prompt_chars(engine: Engine, token_chars: int, num_chars: int, param: str) -> None:
    """400 for a text prompt that is too long for the context whatever its
    tokenization, before tokenizing it (which could take seconds for megabytes)."""
    if token_chars <= 0:
        return
    at_least = -(-num_chars // token_chars)
    if at_least > engine.max_model_len:
        raise APIError(400, context_length_message(
            engine.max_model_len, f"your prompt has {num_chars} characters, which is at least {at_least} tokens "
            f"(a token of this model is at most {token_chars} characters)", "the prompt"),
            param, "context_length_exceeded")


def resolve_max_tokens(engine: Engine, requested: int | None, prompt_len: int, param: str,
                       default_cap: int | None = None) -> int:
    """The request's max_tokens, or, when it gave none, what is left of the
    context up to ``default_cap`` (--default-max-tokens). Raises 400
    (context_length_exceeded) when the prompt and the completion do not fit."""
    limit = engine.max_model_len
    if requested is None:
        if prompt_len >= limit:
            raise APIError(400, context_length_message(
                limit, f"your prompt is {prompt_len} tokens, leaving no room for a completion", "the prompt"),
                param, "context_length_exceeded")
        return limit - prompt_len if default_cap is None else min(default_cap, limit - prompt_len)
    if prompt_len + requested > limit:
        raise APIError(400, context_length_message(limit, requested_tokens(prompt_len, requested)),
                       param, "context_length_exceeded")
    return requested


def check_prompt_ids(engine: Engine, ids: list[int], param: str) -> None:
    if not ids:
        raise APIError(400, "The prompt is empty: it must contain at least one token.", param, "empty_prompt")
    vocab = engine.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"Token id {bad} in the prompt is outside the vocabulary [0, {vocab}).", param,
                       "invalid_token_id")


def sampling_params(engine: Engine, body: _GenerationFields, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None) -> SamplingParams:
    """The engine's sampling params for the request (400 for a value this server refuses)."""
    if body.n > engine.max_n:
        raise APIError(400, f"n must be between 1 and {engine.max_n} on this server (each sequence holds one "
                            f"state slot), got {body.n}", "n", "invalid_value")
    limit = engine.max_logprobs      # prompt_logprobs comes from the same field as logprobs
    k = max((x for x in (logprobs, prompt_logprobs) if x is not None), default=None)
    if k is not None and k > limit:
        name = "top_logprobs" if hasattr(body, "top_logprobs") else "logprobs"   # chat's name, completions'
        raise APIError(400, f"{name} must be at most {limit} on this server (--max-logprobs), got {k}", name,
                       "invalid_value")
    top_k = 0 if body.top_k is None else body.top_k
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if top_k >= engine.vocab_size else top_k,      # keeping the whole vocabulary is no top-k
        min_tokens=body.min_tokens, seed=body.seed, n=body.n, stop=body.stop_list(),
        stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
        logit_bias=tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items()),
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    try:
        params.check(engine.vocab_size, max_n=engine.max_n, max_logprobs=limit)
    except EngineError as e:
        raise from_engine_error(e) from None
    return params


def cache_owner(request: Request) -> str | None:
    """The caller's prefix-cache namespace (its API key's; None without keys)."""
    return getattr(request.state, "cache_owner", None)


def prefix_length(engine: Engine, prefix_id: str | None, pinning: bool = False, owner: str | None = None) -> int:
    """Tokens of the pinned prefix a request starts from (0 without ``prefix_id``);
    400 when the engine has no prefix cache, 404 for an unknown id."""
    if prefix_id is None and not pinning:
        return 0
    if not engine.supports_prefix_cache:
        param = "prefix_id" if prefix_id is not None else "pin_prefix"
        raise APIError(400, f"{param} needs the native engine's prefix cache (this server's engine has none)",
                       param, "unsupported_parameter")
    if prefix_id is None:
        return 0
    try:
        return engine.prefix_info(prefix_id, owner).num_tokens
    except EngineError as e:
        raise from_engine_error(e) from None


def pin_count(body, prompts: list[list[int]]) -> int | None:
    """``pin_prefix`` as a token count of the request's own prompt (True: all of it)."""
    pin = body.pin_prefix
    if pin is None:
        return None
    if len(prompts) != 1:
        raise APIError(400, "pin_prefix needs a single prompt (one prefix id comes back)", "pin_prefix",
                       "invalid_value")
    if pin is True:
        return len(prompts[0])
    if pin > len(prompts[0]):
        raise APIError(400, f"pin_prefix ({pin}) is longer than the prompt ({len(prompts[0])} tokens)",
                       "pin_prefix", "invalid_value")
    return pin


def start_requests(engine: Engine, request_id: str, jobs: list[tuple[list[int], SamplingParams]],
                   prefix_id: str | None = None, pin_prefix: int | None = None, owner: str | None = None,
                   cache_salt: str | None = None) -> list[AsyncIterator[RequestOutput]]:
    """Queue one engine request per (prompt ids, params); all or none (a refusal
    aborts the ones already queued). Each starts from ``prefix_id`` when given;
    ``owner`` and ``cache_salt`` scope its prefix-cache use."""
    streams: list[AsyncIterator[RequestOutput]] = []
    started: list[str] = []
    try:
        for i, (ids, params) in enumerate(jobs):
            rid = request_id if len(jobs) == 1 else f"{request_id}-{i}"
            streams.append(engine.generate(GenerationRequest(rid, ids, params, prefix_id=prefix_id,
                                                             pin_prefix=pin_prefix, cache_owner=owner,
                                                             cache_salt=cache_salt)))
            started.append(rid)
    except EngineError as e:
        for rid, s in zip(started, streams):
            engine.abort(rid)
            _close_quietly(s)
        raise from_engine_error(e) from None
    return streams


def _close_quietly(stream) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        coro = close()
        if asyncio.iscoroutine(coro):
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(coro)


async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several engine streams as they come. Leaving
    early closes (aborts) every stream."""
    if len(streams) == 1:
        stream = streams[0]
        try:
            async for out in stream:
                yield 0, out
        finally:
            await stream.aclose()
        return
    # bounded: a client that stops reading stops the pumps, whose engine streams
    # then fill up and pause their sequences (see NativeEngine)
    queue: asyncio.Queue = asyncio.Queue(maxsize=16 * len(streams))

    async def pump(i: int, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as e:       # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the HTTP client has gone (after the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, coro):
    """Run ``coro``; if the client goes away first, cancel it (which aborts its
    engine requests) and raise ``APIError(499)``."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise APIError(499, "client closed the request", code="client_closed_request")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage block; ``cached_tokens``: prompt tokens restored from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def logprob_value(x: float) -> float:
    """JSON has no -inf."""
    return max(float(x), -9999.0)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class GenerationEndpoint:
    """The pipeline of both generation endpoints, in four steps (see ``create``).
    A subclass says what OpenAI's formats make differ: how the prompt comes
    (``_prompt_ids``), which field asks for how many tokens and logprobs, and
    the ``InFlightRequest`` subclass that renders the answer."""

    id_prefix: str                           # of the response id: "cmpl", "chatcmpl"
    prompt_param: str                        # the field that errors about the prompt name
    answer_class: type[InFlightRequest]

    def __init__(self, engine: Engine, metrics: Metrics, default_max_tokens: int | None = None):
        self.engine = engine
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.token_strings = TokenStrings(engine.tokenizer)
        self.token_chars = max_token_chars(engine.tokenizer)

    async def _prompt_ids(self, body) -> tuple[list[list[int]], list[str | None]]:
        """The request's prompts as token ids, and their texts where it gave text."""
        raise NotImplementedError

    def _echo_texts(self, body, prompts: list[list[int]], texts: list[str | None]) -> list[str | None]:
        """The prompt texts the answer repeats (completions' echo)."""
        return texts

    def _requested_tokens(self, body) -> int | None:
        """The request's max_tokens (None: what the context leaves)."""
        return body.max_tokens

    def _logprob_counts(self, body, max_tokens: int) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) for the engine: alternatives per position, None for none."""
        raise NotImplementedError

    async def create(self, body, raw: Request):
        """Answer one request: JSON, or a stream of server-sent events."""
        engine = self.engine
        # 1. the request as a whole: model, fields we cannot honour, the prefix it starts from
        check_model(engine, body.model)
        check_supported(body)
        owner = cache_owner(raw)
        num_prefix = prefix_length(engine, body.prefix_id, body.pin_prefix is not None, owner)
        # 2. prompt ids
        prompts, texts = await self._prompt_ids(body)
        pin = pin_count(body, prompts)
        texts = self._echo_texts(body, prompts, texts)
        # 3. sampling params, one set per prompt
        jobs = []
        for ids in prompts:
            check_prompt_ids(engine, ids, self.prompt_param)
            max_tokens = resolve_max_tokens(engine, self._requested_tokens(body), num_prefix + len(ids),
                                            self.prompt_param, self.default_max_tokens)
            logprobs, prompt_logprobs = self._logprob_counts(body, max_tokens)
            jobs.append((ids, sampling_params(engine, body, max_tokens, logprobs, prompt_logprobs)))
        # 4. the engine requests, then the answer: whole, or streamed as it comes
        request_id = new_id(self.id_prefix)
        arrival = time.monotonic()
        streams = start_requests(engine, request_id, jobs, body.prefix_id, pin, owner, body.cache_salt)
        answer = self.answer_class(self, body, request_id, prompts, texts, arrival, num_prefix)
        if body.stream:
            return StreamingResponse(answer.stream(streams), media_type="text/event-stream", headers=_SSE_HEADERS)
        return JSONResponse(await unless_disconnected(raw, answer.collect(streams)))


@dataclass
class Choice:
    """One sequence of the answer, as its outputs arrive."""
    text: list[str] = field(default_factory=list)
    entries: list[tuple[int, TokenLogprob | None]] = field(default_factory=list)   # for logprobs
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class InFlightRequest:
    """One generation request in flight: folds the engine's outputs into
    choices (choice ``i * n + j`` is sequence j of prompt i) and renders them,
    whole (``collect``) or as server-sent events ending with ``data: [DONE]``
    (``stream``). A subclass renders its format's choices and deltas."""

    object_name: str                 # "object" of the whole answer
    chunk_object_name: str           # "object" of a streamed chunk

    def __init__(self, endpoint: GenerationEndpoint, body, request_id: str, prompts: list[list[int]],
                 texts: list[str | None], arrival: float, num_prefix: int = 0):
        self.ep = endpoint
        self.body = body
        self.request_id = request_id
        self.prompts = prompts
        self.texts = texts
        self.n = body.n
        self.created = int(time.time())
        self.model = endpoint.engine.model_name
        self.choices = [Choice() for _ in range(len(prompts) * self.n)]
        self.timers = [SequenceTimer(endpoint.metrics, arrival, num_prefix + len(prompts[k // self.n]))
                       for k in range(len(self.choices))]
        self.prompt_lps: list[list[TokenLogprob | None] | None] = [None] * len(prompts)
        self.num_prefix = num_prefix
        self.cached = [0] * len(prompts)
        self.prefix_id: str | None = None          # pinned for this request

    # --- what a format renders ----------------------------------------------------------
    def _whole_choice(self, k: int, c: Choice) -> dict:
        """Choice ``k`` of the whole answer."""
        raise NotImplementedError

    def _delta_logprobs(self, k: int, d: SequenceDelta) -> dict | None:
        """The logprobs of a streamed delta of choice ``k`` (None without)."""
        raise NotImplementedError

    def _delta_content(self, text: str) -> dict:
        """The new text of a streamed delta, in the format's field."""
        raise NotImplementedError

    def _opening_choices(self) -> list[dict]:
        """Choices streamed before any output (chat: the role)."""
        return []

    def _prompt_choices(self, i: int) -> list[dict]:
        """Choices streamed once prompt ``i``'s first output has arrived (completions: the echo)."""
        return []

    # --- shared ---------------------------------------------------------------------------
    def _usage(self) -> dict:
        prompt_tokens = sum(self.num_prefix + len(p) for p in self.prompts)
        return usage(prompt_tokens, sum(c.num_tokens for c in self.choices), sum(self.cached))

    def _token(self, token_id: int) -> str:
        if self.body.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        return self.ep.token_strings.text(token_id)

    def _take(self, i: int, out: RequestOutput) -> list[tuple[int, SequenceDelta]]:
        """Fold one engine output of prompt ``i`` into the choices; return (choice index, delta) pairs."""
        if out.prompt_logprobs is not None:
            self.prompt_lps[i] = out.prompt_logprobs
        self.cached[i] = out.num_cached_tokens
        self.prefix_id = out.prefix_id or self.prefix_id
        deltas = []
        for d in out.outputs:
            k = i * self.n + d.index
            c = self.choices[k]
            c.text.append(d.text)
            c.num_tokens += len(d.token_ids)
            if d.logprobs is not None:
                c.entries.extend(zip(d.token_ids, d.logprobs))
            self.timers[k].queued(out.queue_time)
            self.timers[k].tokens_arrived(len(d.token_ids))
            if d.finish_reason is not None:
                c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
                self.timers[k].finished(d.finish_reason)
            deltas.append((k, d))
        return deltas

    async def collect(self, streams) -> dict:
        try:
            async for i, out in merged(streams):
                self._take(i, out)
        except EngineError as e:
            raise from_engine_error(e) from None
        choices = [self._whole_choice(k, c) for k, c in enumerate(self.choices)]
        response = {"id": self.request_id, "object": self.object_name, "created": self.created,
                    "model": self.model, "choices": choices, "usage": self._usage()}
        if self.prefix_id is not None:
            response["prefix_id"] = self.prefix_id
        return response

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        payload = {"id": self.request_id, "object": self.chunk_object_name, "created": self.created,
                   "model": self.model, "choices": choices}
        if self.prefix_id is not None:
            payload["prefix_id"] = self.prefix_id
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def stream(self, streams):
        opts = self.body.stream_options
        continuous = bool(opts and opts.continuous_usage_stats)
        try:
            for choice in self._opening_choices():
                yield self._chunk([choice])
            async for i, out in merged(streams):
                deltas = self._take(i, out)
                for choice in self._prompt_choices(i):
                    yield self._chunk([choice])
                for k, d in deltas:
                    lps = self._delta_logprobs(k, d)
                    if not (d.text or d.finish_reason or lps):
                        continue
                    yield self._chunk([{"index": k, **self._delta_content(d.text), "logprobs": lps,
                                        "finish_reason": d.finish_reason, "stop_reason": d.stop_reason}],
                                      self._usage() if continuous else None)
            if opts is not None and opts.include_usage:
                yield self._chunk([], self._usage())
        except EngineError as e:
            yield sse_error(from_engine_error(e))
        except APIError as e:
            yield sse_error(e)
        yield "data: [DONE]\n\n"
