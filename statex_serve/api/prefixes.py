"""Pinned prefixes: ``POST /v1/prefixes`` (pin the state after a prompt, no
generation), ``GET /v1/prefixes`` (list), ``GET /v1/prefixes/{id}``,
``DELETE /v1/prefixes/{id}``. A request starts from one with ``prefix_id``;
``pin_prefix`` on a completion pins one too. Unknown ids answer 404 with
code ``prefix_not_found``. Ids are content hashes: pinning the same tokens
twice (with the same key and ``cache_salt``) gives the same id. Pins belong to
the API key that made them: another key neither lists, reads, continues nor
deletes them (404, as for an id never pinned).
"""
from __future__ import annotations

import asyncio
import time

from fastapi import Request

from statex_serve.api.errors import APIError, from_engine_error
from statex_serve.api.generation import (
    cache_owner, check_model, check_prompt_chars, check_prompt_ids, max_token_chars, merged, new_id, prefix_length,
    resolve_max_tokens, start_requests, unless_disconnected,
)
from statex_serve.api.schemas import PrefixCreateRequest
from statex_serve.engine.base import Engine, EngineError, PrefixInfo, SamplingParams


def prefix_card(info: PrefixInfo) -> dict:
    return {"id": info.id, "object": "prefix", "num_tokens": info.num_tokens, "bytes": info.bytes,
            "location": info.location, "created": int(info.created), "last_used": int(info.last_used),
            "hits": info.hits}


class PrefixesEndpoint:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.token_chars = max_token_chars(engine.tokenizer)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except EngineError as e:
            raise from_engine_error(e) from None

    async def create(self, body: PrefixCreateRequest, raw: Request) -> dict:
        """POST /v1/prefixes: prefill the prompt and pin the state after it."""
        engine = self.engine
        check_model(engine, body.model)
        owner = cache_owner(raw)
        num_prefix = prefix_length(engine, body.prefix_id, pinning=True, owner=owner)
        if isinstance(body.prompt, str):
            special = body.add_special_tokens and body.prefix_id is None
            check_prompt_chars(engine, self.token_chars, len(body.prompt), "prompt")
            ids = await asyncio.to_thread(engine.tokenizer.encode, body.prompt, add_special_tokens=special)
        else:
            ids = list(body.prompt)
        check_prompt_ids(engine, ids, "prompt")
        resolve_max_tokens(engine, 1, num_prefix + len(ids), "prompt")
        # one greedy token sampled from the prefill's logits and dropped: no decode step runs
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        streams = start_requests(engine, new_id("pin"), [(ids, params)], body.prefix_id, len(ids), owner,
                                 body.cache_salt)
        t0 = time.monotonic()

        async def run() -> dict:
            pid, cached = None, 0
            try:
                async for _, out in merged(streams):
                    pid, cached = out.prefix_id or pid, out.num_cached_tokens
            except EngineError as e:
                raise from_engine_error(e) from None
            if pid is None:
                raise APIError(500, "the prefix was not pinned", code="internal_error")
            card = prefix_card(self._call(engine.prefix_info, pid, owner))
            return {**card, "cached_tokens": cached, "seconds": round(time.monotonic() - t0, 6)}
        return await unless_disconnected(raw, run())

    def list(self, raw: Request) -> dict:
        return {"object": "list", "data": [prefix_card(i) for i in self.engine.list_prefixes(cache_owner(raw))]}

    def get(self, prefix_id: str, raw: Request) -> dict:
        return prefix_card(self._call(self.engine.prefix_info, prefix_id, cache_owner(raw)))

    def delete(self, prefix_id: str, raw: Request) -> dict:
        info = self._call(self.engine.delete_prefix, prefix_id, cache_owner(raw))
        return {"id": info.id, "object": "prefix", "deleted": True}
