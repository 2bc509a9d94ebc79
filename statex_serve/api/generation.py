"""What completions and chat share: checking a request against the engine,
building engine requests, running several of them as one merged stream, and
noticing a client that went away."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from statex_serve.api.errors import APIError, from_engine_error
from statex_serve.api.schemas import _GenerationFields
from statex_serve.engine.base import Engine, EngineError, GenerationRequest, RequestOutput, SamplingParams

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
        raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens. However, your "
                            f"prompt has {num_chars} characters, which is at least {at_least} tokens (a token "
                            f"of this model is at most {token_chars} characters). Please reduce the length of "
                            "the prompt.", param, "context_length_exceeded")


def resolve_max_tokens(engine: Engine, requested: int | None, prompt_len: int, param: str,
                       default_cap: int | None = None) -> int:
    """The request's max_tokens, or, when it gave none, what is left of the
    context up to ``default_cap`` (--default-max-tokens). Raises 400
    (context_length_exceeded) when the prompt and the completion do not fit."""
    limit = engine.max_model_len
    if requested is None:
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt "
                                f"is {prompt_len} tokens, leaving no room for a completion. Please reduce the "
                                "length of the prompt.", param, "context_length_exceeded")
        return limit - prompt_len if default_cap is None else min(default_cap, limit - prompt_len)
    if prompt_len + requested > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
                            "completion). Please reduce the length of the prompt or completion.",
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
