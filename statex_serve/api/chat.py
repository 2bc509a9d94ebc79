"""POST /v1/chat/completions: messages -> prompt through the tokenizer's chat
template -> assistant messages, whole or streamed. The pipeline is
``generation.py``'s; here is what chat's format adds.

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

from model_registry.tokenizer import DEFAULT_CHAT_TEMPLATE
from statex_serve.api.errors import APIError
from statex_serve.api.generation import (
    Choice, GenerationEndpoint, InFlightRequest, check_prompt_chars, check_prompt_ids, logprob_value,
)
from statex_serve.api.schemas import ChatCompletionRequest, ChatMessage
from statex_serve.engine.base import SequenceDelta, TokenLogprob


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


class _ChatCompletion(InFlightRequest):
    """A chat answer: one prompt, choices carry an assistant ``message`` (streamed:
    a ``delta``, the role first), logprobs come as ``content`` entries with bytes."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _logprobs(self, entries: list[tuple[int, TokenLogprob]]) -> dict:
        ts = self.ep.token_strings
        content = []
        for token_id, lp in entries:
            content.append({
                "token": self._token(token_id), "logprob": logprob_value(lp.logprob), "bytes": ts.bytes(token_id),
                "top_logprobs": [{"token": self._token(t), "logprob": logprob_value(v), "bytes": ts.bytes(t)}
                                 for t, v in lp.top]})
        return {"content": content, "refusal": None}

    def _whole_choice(self, k: int, c: Choice) -> dict:
        return {"index": k, "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": self._logprobs(c.entries) if self.body.logprobs else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def _opening_choices(self) -> list[dict]:
        # the role first, before any token (OpenAI does the same)
        return [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for k in range(self.n)]

    def _delta_logprobs(self, k: int, d: SequenceDelta) -> dict | None:
        return self._logprobs(list(zip(d.token_ids, d.logprobs))) if d.logprobs else None

    def _delta_content(self, text: str) -> dict:
        return {"delta": {"content": text} if text else {}}


class ChatEndpoint(GenerationEndpoint):
    id_prefix = "chatcmpl"
    prompt_param = "messages"
    answer_class = _ChatCompletion

    async def _prompt_ids(self, body: ChatCompletionRequest) -> tuple[list[list[int]], list[str | None]]:
        check_prompt_chars(self.engine, self.token_chars, message_chars(body.messages), "messages")
        # off the event loop (see completions)
        ids = await asyncio.to_thread(render_chat, self.engine.tokenizer, body.messages, body.add_generation_prompt,
                                      body.continue_final_message, body.chat_template_kwargs)
        # checked here, before pin_prefix is measured against the prompt, as chat always has
        # (the pipeline checks again, as it does for completions' prompts)
        check_prompt_ids(self.engine, ids, "messages")
        return [ids], [None]

    def _requested_tokens(self, body: ChatCompletionRequest) -> int | None:
        return body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens

    def _logprob_counts(self, body: ChatCompletionRequest, max_tokens: int) -> tuple[int | None, int | None]:
        return (body.top_logprobs or 0) if body.logprobs else None, None
