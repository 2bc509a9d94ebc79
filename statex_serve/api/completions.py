"""POST /v1/completions: prompts (text or token ids, one or many) -> choices,
whole or streamed as server-sent events ending with ``data: [DONE]``. The
pipeline is ``generation.py``'s; here is what completions' format adds.

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

from statex_serve.api.errors import APIError
from statex_serve.api.generation import (
    Choice, GenerationEndpoint, InFlightRequest, check_prompt_chars, logprob_value,
)
from statex_serve.api.schemas import CompletionRequest
from statex_serve.engine.base import SequenceDelta, TokenLogprob


class _Completion(InFlightRequest):
    """A completions answer: choices carry ``text``, logprobs come as OpenAI's
    legacy lists (tokens, token_logprobs, top_logprobs, text_offset)."""

    object_name = chunk_object_name = "text_completion"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.echoed = [False] * len(self.prompts)        # streamed: each prompt's echo goes once
        self.offsets = [0] * len(self.choices)           # streamed: each choice's text so far

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

    def _whole_choice(self, k: int, c: Choice) -> dict:
        i = k // self.n
        prefix = self.texts[i] if self.body.echo else ""
        logprobs = None
        if self.body.logprobs is not None:
            entries = (self._prompt_entries(i) if self.body.echo else []) + c.entries
            logprobs = self._logprobs(entries, 0)
        return {"index": k, "text": prefix + "".join(c.text), "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def _prompt_choices(self, i: int) -> list[dict]:
        if not self.body.echo or self.echoed[i]:
            return []
        self.echoed[i] = True
        choices = []
        for j in range(self.n):
            k = i * self.n + j
            lps = None
            if self.body.logprobs is not None:
                lps = self._logprobs(self._prompt_entries(i), 0)
            self.offsets[k] = len(self.texts[i])
            choices.append({"index": k, "text": self.texts[i], "logprobs": lps, "finish_reason": None,
                            "stop_reason": None})
        return choices

    def _delta_logprobs(self, k: int, d: SequenceDelta) -> dict | None:
        lps = None
        if d.logprobs:
            lps = self._logprobs(list(zip(d.token_ids, d.logprobs)), self.offsets[k])
        self.offsets[k] += len(d.text)
        return lps

    def _delta_content(self, text: str) -> dict:
        return {"text": text}


class CompletionsEndpoint(GenerationEndpoint):
    id_prefix = "cmpl"
    prompt_param = "prompt"
    answer_class = _Completion

    async def _prompt_ids(self, body: CompletionRequest) -> tuple[list[list[int]], list[str | None]]:
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

    def _echo_texts(self, body: CompletionRequest, prompts: list[list[int]],
                    texts: list[str | None]) -> list[str | None]:
        if not body.echo:
            return texts
        return [t if t is not None else self.engine.tokenizer.decode(ids, skip_special_tokens=False)
                for ids, t in zip(prompts, texts)]

    def _logprob_counts(self, body: CompletionRequest, max_tokens: int) -> tuple[int | None, int | None]:
        prompt_logprobs = None
        if body.echo and body.logprobs is not None:
            prompt_logprobs = body.logprobs
        elif body.echo and max_tokens == 0:
            prompt_logprobs = 0      # scoring-only request without logprobs: just echo
        return body.logprobs, prompt_logprobs
