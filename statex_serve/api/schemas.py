"""Request bodies of the OpenAI-compatible endpoints (pydantic). Responses are
built as plain dicts by ``generation.py``, each format's parts in
``completions.py`` / ``chat.py`` (their shapes follow OpenAI's, field for field).

Fields we accept beyond OpenAI's are vLLM's names for the same things (top_k,
min_tokens, repetition_penalty, stop_token_ids, ignore_eos, skip_special_tokens,
include_stop_str_in_output, add_special_tokens, return_tokens_as_token_ids), so
clients written for vLLM work unchanged. Ours: ``pin_prefix`` and ``prefix_id``
(the prefix cache; see docs/prefix-cache.md), passed by OpenAI clients through
``extra_body``; and vLLM's ``cache_salt`` (prefix-cache hits only among requests
with the same salt). Unknown fields are ignored with a log line, as vLLM does;
known fields we cannot honour (min_p, suffix, tools, ...) are refused with a 400
that says so, rather than silently ignored. ``FIELD_DOCS`` describes every field
in the OpenAPI schema (/docs).
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from statex_serve.engine.base import MAX_REPETITION_PENALTY, MAX_TOP_K, MIN_REPETITION_PENALTY


def _no_surrogates(v: str) -> str:
    """JSON may carry lone UTF-16 surrogates (``"\\ud800"``); no tokenizer or
    UTF-8 encoder takes them, so they are refused at the edge."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text contains a lone UTF-16 surrogate (not valid Unicode)") from None
    return v


# Every string a request carries: strict (no coercion) and valid Unicode.
Text = Annotated[StrictStr, AfterValidator(_no_surrogates)]


# What each request field does, for the OpenAPI schema (/docs): one line each,
# added to the properties of every model that has the field.
FIELD_DOCS = {
    "model": "The served model name (GET /v1/models lists them); omitted: the server's model.",
    "prompt": "A string, a list of strings, a list of token ids, or a list of lists of token ids "
              "(one completion per prompt).",
    "messages": "The conversation, rendered into a prompt by the model's chat template.",
    "max_tokens": "The most tokens to generate per sequence (prompt + max_tokens must fit the context).",
    "max_completion_tokens": "OpenAI's newer name for max_tokens (wins when both are given).",
    "temperature": "Sampling temperature in [0, 2]; 0 is greedy (argmax).",
    "top_p": "Nucleus sampling: keep the most likely tokens whose mass reaches top_p, in (0, 1].",
    "top_k": "Keep the k most likely tokens; 0 or -1: all.",
    "min_p": "vLLM's min_p: not supported by this server (only 0).",
    "n": "Sequences to generate per prompt (each holds its own state slot).",
    "stream": "Send the answer as server-sent events, chunk by chunk.",
    "stream_options": "With stream: include_usage adds a final chunk with usage; continuous_usage_stats "
                      "adds usage to every chunk.",
    "stop": "Up to 16 strings that end a sequence (not included in the text unless include_stop_str_in_output).",
    "stop_token_ids": "Token ids that end a sequence, besides the end-of-sequence token.",
    "seed": "Seed for sampling: sequence i of n samples with seed + i, whatever else runs beside it.",
    "presence_penalty": "In [-2, 2]: subtracted from the logit of every token already generated (vLLM's "
                        "definition).",
    "frequency_penalty": "In [-2, 2]: subtracted from a token's logit once per time it was generated.",
    "repetition_penalty": "vLLM's: a token seen in the prompt or the output has its logit divided by this "
                          "(positive logits) or multiplied by it (negative); 1: off.",
    "logit_bias": "Token id (as a string) -> bias in [-100, 100] added to its logit before sampling.",
    "user": "An end-user id (accepted, not used).",
    "ignore_eos": "Keep generating past the end-of-sequence token (stop strings and stop_token_ids still stop).",
    "min_tokens": "Stop tokens and stop strings are ignored until this many tokens are generated.",
    "skip_special_tokens": "Leave special tokens out of the text.",
    "include_stop_str_in_output": "Keep the matched stop string at the end of the text.",
    "return_tokens_as_token_ids": "Name tokens in logprobs as 'token_id:N' instead of their text.",
    "prefix_id": "Start from a pinned prefix (POST /v1/prefixes or pin_prefix): the prompt continues it.",
    "pin_prefix": "Pin the state after the prompt (true) or after its first k tokens (k); its id comes back "
                  "as prefix_id.",
    "cache_salt": "Prefix-cache hits only among requests with the same salt (and the same API key).",
    "echo": "Return the prompt before the completion (with logprobs: the prompt's logprobs too).",
    "logprobs": "Completions: the number of top alternatives per token to return with its logprob (at most "
                "--max-logprobs). Chat: return logprobs (true/false).",
    "top_logprobs": "Chat, with logprobs: alternatives per token (at most --max-logprobs).",
    "suffix": "Text after the completion (insertion): not supported by this server.",
    "best_of": "Only best_of = n is supported.",
    "add_special_tokens": "Add the tokenizer's special tokens (e.g. BOS) when tokenizing the prompt.",
    "response_format": "Only {\"type\": \"text\"} is supported.",
    "tools": "Tool calling: not supported by this server.",
    "tool_choice": "Tool calling: not supported by this server.",
    "functions": "Function calling: not supported by this server.",
    "add_generation_prompt": "End the rendered chat with the assistant's turn header.",
    "continue_final_message": "Continue the last (assistant) message instead of starting a new one.",
    "chat_template_kwargs": "Extra variables for the chat template.",
    "tokens": "Token ids to turn back into text.",
    "role": "Who speaks: system, developer, user, assistant, tool or function.",
    "content": "The message's text, or a list of text parts.",
    "name": "An optional name of the speaker.",
    "type": "The part's (or format's) type: 'text' is the one supported.",
    "text": "The text of a text part.",
    "include_usage": "Send a last chunk with the usage of the whole request.",
    "continuous_usage_stats": "Add the usage so far to every chunk (vLLM's option).",
}


def _describe_fields(schema: dict, model=None) -> None:
    for name, prop in schema.get("properties", {}).items():
        if name in FIELD_DOCS and "description" not in prop:
            prop["description"] = FIELD_DOCS[name]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_describe_fields)
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _GenerationFields(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_describe_fields)

    model: Text | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1, le=MAX_TOP_K)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = Field(None, ge=-2**63, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    return_tokens_as_token_ids: StrictBool = False   # logprobs name tokens "token_id:N" (vLLM's option)
    # prefix cache: start from a pinned prefix (the prompt continues it) / pin the
    # state after the prompt (true) or after its first k tokens (k) and return its id
    prefix_id: Text | None = None
    pin_prefix: StrictBool | StrictInt | None = None
    # vLLM's field: prefix-cache hits only among requests with the same salt
    # (and the same API key)
    cache_salt: Text | None = Field(None, min_length=1, max_length=256)

    @field_validator("pin_prefix")
    @classmethod
    def _pin_positive(cls, v):
        if v is False:
            return None
        if v is not True and v is not None and v < 1:
            raise ValueError("pin_prefix must be true or a positive number of prompt tokens")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        for key, bias in (v or {}).items():
            try:
                int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias}")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def unsupported(self) -> tuple[str, str] | None:
        """(param, why) for a field set to something this server cannot do."""
        if self.min_p:
            return "min_p", "min_p is not supported by this server (use 0)"
        return None


def _check_prompt(v: Any):
    """str | list[str] | list[int] | list[list[int]], none of them empty."""
    shape = ("prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids")
    if isinstance(v, str):
        return _no_surrogates(v)
    if not isinstance(v, list) or not v:
        raise ValueError(shape if not isinstance(v, list) else "prompt must not be an empty list")
    if all(isinstance(x, str) for x in v):
        for x in v:
            _no_surrogates(x)
        return v
    if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return v
    if all(isinstance(x, list) for x in v):
        for x in v:
            if not x:
                raise ValueError("prompt must not contain an empty list of token ids")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
                raise ValueError(shape)
        return v
    raise ValueError(shape)


class CompletionRequest(_GenerationFields):
    prompt: Any
    max_tokens: StrictInt | None = Field(16, ge=0)
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0)        # at most the server's --max-logprobs
    suffix: Text | None = None
    best_of: StrictInt | None = Field(None, ge=1)
    add_special_tokens: StrictBool = True

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, v):
        return _check_prompt(v)

    def unsupported(self):
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by this server"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of other than n is not supported by this server"
        return super().unsupported()


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_describe_fields)
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_describe_fields)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        """The message's text (a list of parts must be text parts)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported (text only)")
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_describe_fields)
    type: Text


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0)    # at most the server's --max-logprobs
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _kwargs_text(cls, v):
        try:     # the template renders these into the prompt: they must be valid Unicode too
            json.dumps(v, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError, UnicodeEncodeError):
            raise ValueError("chat_template_kwargs must be JSON with valid Unicode text") from None
        return v

    def unsupported(self):
        if self.tools or self.functions:
            return "tools", "tool calling is not supported by this server"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", f"response_format {self.response_format.type!r} is not supported (only 'text')"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()


class PrefixCreateRequest(BaseModel):
    """POST /v1/prefixes: pin the state after a prompt without generating."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_describe_fields)
    model: Text | None = None
    prompt: Text | list[StrictInt]
    prefix_id: Text | None = None      # extend a pinned prefix
    cache_salt: Text | None = Field(None, min_length=1, max_length=256)
    add_special_tokens: StrictBool = True

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("prompt must not be empty")
        return v


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize (vLLM's benchmark client uses it to align prompts)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_describe_fields)
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_describe_fields)
    model: Text | None = None
    tokens: list[StrictInt]
