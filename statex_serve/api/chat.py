"""POST /v1/chat/completions: messages -> prompt through the tokenizer's chat
template -> assistant messages, whole or streamed.

When the tokenizer has no chat template, ``model_registry.tokenizer.DEFAULT_CHAT_TEMPLATE``
is used: one ``role: content`` line per message, then ``assistant:`` (documented
in the README). The rendered text is tokenized without adding special tokens
(templates add their own BOS).

Prefix cache fields as in completions: with ``prefix_id`` the rendered
messages are appended to the pinned prefix's tokens as they are;
``pin_prefix`` counts tokens of the rendered prompt.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from model_registry.tokenizer import DEFAULT_CHAT_TEMPLATE
from statex_serve.api.errors import APIError, from_engine_error, sse_error
from statex_serve.api.generation import (
    cache_owner, check_model, check_prompt_chars, check_prompt_ids, check_supported, logprob_value, max_token_chars,
    merged, new_id, pin_count, prefix_length, resolve_max_tokens, sampling_params, start_requests,
    unless_disconnected, usage,
)
from statex_serve.api.metrics import Metrics, SequenceTimer
from statex_serve.api.schemas import ChatCompletionRequest, ChatMessage
from statex_serve.engine.base import Engine, EngineError, TokenLogprob
from statex_serve.engine.detokenizer import TokenStrings


def message_chars(messages: list[ChatMessage]) -> int:
    """Characters of the messages' text (the template only adds to it)."""
    total = 0
    for m in messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content is not None:
            total += sum(len(part.text or "") for part in m.content)
    return total


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
                continue_final_message: bool = False, template_kwargs: dict | None = None) -> list[int]:
    """Messages -> prompt token ids (400 on a message or template the template rejects)."""
    try:
        msgs = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
    except ValueError as e:
        raise APIError(400, str(e), "messages", "invalid_value") from None
    if continue_final_message and add_generation_prompt:
        raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                       "continue_final_message", "invalid_value")
    if continue_final_message and msgs[-1]["role"] != "assistant":
        raise APIError(400, "continue_final_message needs the last message to be the assistant's",
                       "messages", "invalid_value")
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message,
                                             **(template_kwargs or {}))
    except Exception as e:   # jinja raises what the template says (e.g. roles must alternate)
        raise APIError(400, f"the chat template could not render these messages: {e}", "messages",
                       "invalid_value") from None
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    entries: list[tuple[int, TokenLogprob]] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatEndpoint:
    def __init__(self, engine: Engine, metrics: Metrics, default_max_tokens: int | None = None):
        self.engine = engine
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.token_strings = TokenStrings(engine.tokenizer)
        self.token_chars = max_token_chars(engine.tokenizer)

    async def create(self, body: ChatCompletionRequest, raw: Request):
        engine = self.engine
        check_model(engine, body.model)
        check_supported(body)
        owner = cache_owner(raw)
        num_prefix = prefix_length(engine, body.prefix_id, body.pin_prefix is not None, owner)
        check_prompt_chars(engine, self.token_chars, message_chars(body.messages), "messages")
        # off the event loop (see completions)
        ids = await asyncio.to_thread(render_chat, engine.tokenizer, body.messages, body.add_generation_prompt,
                                      body.continue_final_message, body.chat_template_kwargs)
        check_prompt_ids(engine, ids, "messages")
        pin = pin_count(body, [ids])
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = resolve_max_tokens(engine, requested, num_prefix + len(ids), "messages", self.default_max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(engine, body, max_tokens, logprobs, None)
        request_id = new_id("chatcmpl")
        arrival = time.monotonic()
        streams = start_requests(engine, request_id, [(ids, params)], body.prefix_id, pin, owner, body.cache_salt)
        ctx = _Context(self, body, request_id, num_prefix + len(ids), arrival)
        if body.stream:
            return StreamingResponse(ctx.stream(streams), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await unless_disconnected(raw, ctx.collect(streams)))


class _Context:
    def __init__(self, endpoint: ChatEndpoint, body: ChatCompletionRequest, request_id: str, num_prompt: int,
                 arrival: float):
        self.ep = endpoint
        self.body = body
        self.request_id = request_id
        self.num_prompt = num_prompt
        self.created = int(time.time())
        self.model = endpoint.engine.model_name
        self.choices = [_Choice() for _ in range(body.n)]
        self.timers = [SequenceTimer(endpoint.metrics, arrival, num_prompt) for _ in self.choices]
        self.cached = 0
        self.prefix_id: str | None = None          # pinned for this request

    def _usage(self) -> dict:
        return usage(self.num_prompt, sum(c.num_tokens for c in self.choices), self.cached)

    def _token(self, token_id: int) -> str:
        if self.body.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        return self.ep.token_strings.text(token_id)

    def _logprobs(self, entries: list[tuple[int, TokenLogprob]]) -> dict:
        ts = self.ep.token_strings
        content = []
        for token_id, lp in entries:
            content.append({
                "token": self._token(token_id), "logprob": logprob_value(lp.logprob), "bytes": ts.bytes(token_id),
                "top_logprobs": [{"token": self._token(t), "logprob": logprob_value(v), "bytes": ts.bytes(t)}
                                 for t, v in lp.top]})
        return {"content": content, "refusal": None}

    def _take(self, out) -> list:
        self.cached = out.num_cached_tokens
        self.prefix_id = out.prefix_id or self.prefix_id
        for d in out.outputs:
            c = self.choices[d.index]
            c.text.append(d.text)
            c.num_tokens += len(d.token_ids)
            if d.logprobs is not None:
                c.entries.extend(zip(d.token_ids, d.logprobs))
            self.timers[d.index].queued(out.queue_time)
            self.timers[d.index].tokens_arrived(len(d.token_ids))
            if d.finish_reason is not None:
                c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
                self.timers[d.index].finished(d.finish_reason)
        return out.outputs

    async def collect(self, streams) -> dict:
        try:
            async for _, out in merged(streams):
                self._take(out)
        except EngineError as e:
            raise from_engine_error(e) from None
        choices = [{"index": k, "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": self._logprobs(c.entries) if self.body.logprobs else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                   for k, c in enumerate(self.choices)]
        response = {"id": self.request_id, "object": "chat.completion", "created": self.created,
                    "model": self.model, "choices": choices, "usage": self._usage()}
        if self.prefix_id is not None:
            response["prefix_id"] = self.prefix_id
        return response

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        payload = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
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
            for k in range(self.body.n):   # the role first, before any token (OpenAI does the same)
                yield self._chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}])
            async for _, out in merged(streams):
                for d in self._take(out):
                    lps = self._logprobs(list(zip(d.token_ids, d.logprobs))) if d.logprobs else None
                    if not (d.text or d.finish_reason or lps):
                        continue
                    delta = {"content": d.text} if d.text else {}
                    yield self._chunk([{"index": d.index, "delta": delta, "logprobs": lps,
                                        "finish_reason": d.finish_reason, "stop_reason": d.stop_reason}],
                                      self._usage() if continuous else None)
            if opts is not None and opts.include_usage:
                yield self._chunk([], self._usage())
        except EngineError as e:
            yield sse_error(from_engine_error(e))
        except APIError as e:
            yield sse_error(e)
        yield "data: [DONE]\n\n"
