"""POST /v1/completions: prompts (text or token ids, one or many) -> choices,
whole or streamed as server-sent events ending with ``data: [DONE]``.

Choice ``i * n + j`` is sequence j of prompt i, as in OpenAI's API. With
``echo`` the prompt's text (and, with ``logprobs``, its tokens' logprobs, the
first being null) comes before the completion: that is how lm-evaluation-harness
scores prompts (``max_tokens=0`` is allowed for it).

Prefix cache fields: ``prefix_id`` starts every prompt from a pinned prefix
(text prompts are then tokenized without special tokens: they continue it);
``pin_prefix`` pins a single prompt's state and the response carries
``prefix_id``. ``usage.prompt_tokens`` counts a pinned prefix's tokens too and
``usage.prompt_tokens_details.cached_tokens`` those restored, not prefilled.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from statex_serve.api.errors import APIError, from_engine_error, sse_error
from statex_serve.api.generation import (
    cache_owner, check_model, check_prompt_chars, check_prompt_ids, check_supported, logprob_value, max_token_chars,
    merged, new_id, pin_count, prefix_length, resolve_max_tokens, sampling_params, start_requests,
    unless_disconnected, usage,
)
from statex_serve.api.metrics import Metrics, SequenceTimer
from statex_serve.api.schemas import CompletionRequest
from statex_serve.engine.base import Engine, EngineError, TokenLogprob
from statex_serve.engine.detokenizer import TokenStrings


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    entries: list[tuple[int, TokenLogprob | None]] = field(default_factory=list)   # for logprobs
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionsEndpoint:
    def __init__(self, engine: Engine, metrics: Metrics, default_max_tokens: int | None = None):
        self.engine = engine
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.token_strings = TokenStrings(engine.tokenizer)
        self.token_chars = max_token_chars(engine.tokenizer)

    # --- request -> engine ------------------------------------------------------------
    async def _prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        tok = self.engine.tokenizer
        p = body.prompt
        if isinstance(p, str):
            texts = [p]
        elif isinstance(p[0], str):
            texts = list(p)
        elif isinstance(p[0], int):
            return [list(p)], [None]
        else:
            return [list(x) for x in p], [None] * len(p)
        for t in texts:
            if t == "":
                raise APIError(400, "The prompt is empty: it must contain at least one token.", "prompt",
                               "empty_prompt")
            check_prompt_chars(self.engine, self.token_chars, len(t), "prompt")
        special = body.add_special_tokens and body.prefix_id is None   # a continuation gets no BOS
        # off the event loop: a long prompt takes a while to tokenize, and every
        # other stream (and /health) would wait for it
        ids = await asyncio.to_thread(lambda: [tok.encode(t, add_special_tokens=special) for t in texts])
        return ids, texts

    async def create(self, body: CompletionRequest, raw: Request):
        engine = self.engine
        check_model(engine, body.model)
        check_supported(body)
        owner = cache_owner(raw)
        num_prefix = prefix_length(engine, body.prefix_id, body.pin_prefix is not None, owner)
        prompts, texts = await self._prompts(body)
        pin = pin_count(body, prompts)
        if body.echo:
            texts = [t if t is not None else engine.tokenizer.decode(ids, skip_special_tokens=False)
                     for ids, t in zip(prompts, texts)]
        jobs = []
        for ids in prompts:
            check_prompt_ids(engine, ids, "prompt")
            max_tokens = resolve_max_tokens(engine, body.max_tokens, num_prefix + len(ids), "prompt",
                                            self.default_max_tokens)
            prompt_logprobs = None
            if body.echo and body.logprobs is not None:
                prompt_logprobs = body.logprobs
            elif body.echo and max_tokens == 0:
                prompt_logprobs = 0      # scoring-only request without logprobs: just echo
            jobs.append((ids, sampling_params(engine, body, max_tokens, body.logprobs, prompt_logprobs)))
        request_id = new_id("cmpl")
        arrival = time.monotonic()
        streams = start_requests(engine, request_id, jobs, body.prefix_id, pin, owner, body.cache_salt)
        ctx = _Context(self, body, request_id, prompts, texts, arrival, num_prefix)
        if body.stream:
            return StreamingResponse(ctx.stream(streams), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await unless_disconnected(raw, ctx.collect(streams)))


class _Context:
    """One completions request in flight."""

    def __init__(self, endpoint: CompletionsEndpoint, body: CompletionRequest, request_id: str,
                 prompts: list[list[int]], texts: list[str | None], arrival: float, num_prefix: int = 0):
        self.ep = endpoint
        self.body = body
        self.request_id = request_id
        self.prompts = prompts
        self.texts = texts
        self.n = body.n
        self.created = int(time.time())
        self.model = endpoint.engine.model_name
        self.choices = [_Choice() for _ in range(len(prompts) * self.n)]
        self.timers = [SequenceTimer(endpoint.metrics, arrival, num_prefix + len(prompts[k // self.n]))
                       for k in range(len(self.choices))]
        self.prompt_lps: list[list[TokenLogprob | None] | None] = [None] * len(prompts)
        self.num_prefix = num_prefix
        self.cached = [0] * len(prompts)
        self.prefix_id: str | None = None          # pinned for this request

    def _usage(self) -> dict:
        prompt_tokens = sum(self.num_prefix + len(p) for p in self.prompts)
        return usage(prompt_tokens, sum(c.num_tokens for c in self.choices), sum(self.cached))

    def _token(self, token_id: int) -> str:
        if self.body.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        return self.ep.token_strings.text(token_id)

    def _logprobs(self, entries: list[tuple[int, TokenLogprob | None]], text_offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for token_id, lp in entries:
            s = self._token(token_id)
            tokens.append(s)
            offsets.append(text_offset)
            text_offset += len(s)
            if lp is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(logprob_value(lp.logprob))
            top = {self._token(t): logprob_value(v) for t, v in lp.top}
            top.setdefault(s, logprob_value(lp.logprob))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _prompt_entries(self, i: int) -> list[tuple[int, TokenLogprob | None]]:
        lps = self.prompt_lps[i] or [None] * len(self.prompts[i])
        return list(zip(self.prompts[i], lps))

    def _take(self, i: int, out) -> list[tuple[int, object]]:
        """Fold one engine output into the choices; return (choice index, delta) pairs."""
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
        choices = []
        for k, c in enumerate(self.choices):
            i = k // self.n
            prefix = self.texts[i] if self.body.echo else ""
            logprobs = None
            if self.body.logprobs is not None:
                entries = (self._prompt_entries(i) if self.body.echo else []) + c.entries
                logprobs = self._logprobs(entries, 0)
            choices.append({"index": k, "text": prefix + "".join(c.text), "logprobs": logprobs,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        response = {"id": self.request_id, "object": "text_completion", "created": self.created,
                    "model": self.model, "choices": choices, "usage": self._usage()}
        if self.prefix_id is not None:
            response["prefix_id"] = self.prefix_id
        return response

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        payload = {"id": self.request_id, "object": "text_completion", "created": self.created,
                   "model": self.model, "choices": choices}
        if self.prefix_id is not None:
            payload["prefix_id"] = self.prefix_id
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def stream(self, streams):
        opts = self.body.stream_options
        continuous = bool(opts and opts.continuous_usage_stats)
        echoed = [False] * len(self.prompts)
        offsets = [0] * len(self.choices)
        try:
            async for i, out in merged(streams):
                deltas = self._take(i, out)
                if self.body.echo and not echoed[i]:
                    echoed[i] = True
                    for j in range(self.n):
                        k = i * self.n + j
                        lps = None
                        if self.body.logprobs is not None:
                            lps = self._logprobs(self._prompt_entries(i), 0)
                        offsets[k] = len(self.texts[i])
                        yield self._chunk([{"index": k, "text": self.texts[i], "logprobs": lps,
                                            "finish_reason": None, "stop_reason": None}])
                for k, d in deltas:
                    lps = None
                    if d.logprobs:
                        lps = self._logprobs(list(zip(d.token_ids, d.logprobs)), offsets[k])
                    offsets[k] += len(d.text)
                    if not (d.text or d.finish_reason or lps):
                        continue
                    yield self._chunk([{"index": k, "text": d.text, "logprobs": lps,
                                        "finish_reason": d.finish_reason, "stop_reason": d.stop_reason}],
                                      self._usage() if continuous else None)
            if opts is not None and opts.include_usage:
                yield self._chunk([], self._usage())
        except EngineError as e:
            yield sse_error(from_engine_error(e))
        except APIError as e:
            yield sse_error(e)
        yield "data: [DONE]\n\n"
