"""What the bench measures: a *target* generates completions and reports when
each token arrived. Three kinds, one interface:

- ``url:BASE`` (or a bare ``http(s)://`` URL): any OpenAI-compatible server
  (ours, vLLM's own, ...), driven through ``/v1/completions`` with streaming;
- ``spawn:DIR`` (or a bare directory): ``statex-serve --model DIR`` started here
  on a free loopback port, measured as a URL, stopped at the end;
- ``engine:DIR``: the engine in this process (``statex_serve.engine``), no HTTP:
  token times are exact and the difference to ``spawn`` is the HTTP layer.

A spec takes options after ``?``, ``&``-separated: ``label=NAME`` (what tables
and plots call it), ``model=NAME`` (the served name, url), ``tokenizer=DIR`` and
``dir=DIR`` (where the tokenizer / checkpoint lives, for a url whose
``/v1/models`` root is not a local directory), ``api_key=KEY`` and
``device=cpu|cuda`` (url: where the server runs, when it does not say),
``backend=native|vllm`` (spawn, engine); every other option of a spawn target
becomes a ``statex-serve`` flag (``max_num_seqs=8`` -> ``--max-num-seqs 8``),
of an engine target an ``EngineArgs`` field.

Prompts are token ids, so every target reads exactly the tokens the bench made.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import httpx

from statex_serve.testing import ServerProcess

KINDS = ("url", "spawn", "engine")


class BenchError(Exception):
    """Bad input or an unusable target: reported as one line, non-zero exit."""


# --- one request's timings --------------------------------------------------------------

@dataclass
class RequestResult:
    """One completion. Times are seconds from sending the request. ``token_times``
    has one entry per generated token when the target says how many tokens each
    chunk carried (our server and vLLM do, with continuous usage stats): a chunk
    that carries k tokens after a gap g (the detokenizer holds back bytes of an
    unfinished UTF-8 character) counts as k tokens spread evenly over g."""

    prompt_tokens: int
    completion_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    token_times: list[float] = field(default_factory=list)
    chunks: int = 0
    text: str = ""
    token_ids: list[int] | None = None        # only targets that see tokens (engine)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft is not None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if not self.ok or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "ttft_s": self.ttft, "tpot_s": self.tpot, "e2e_s": self.e2e, "chunks": self.chunks,
                "itl_s": [round(x, 6) for x in self.itl], "finish_reason": self.finish_reason, "error": self.error}


def _add_tokens(res: RequestResult, total: int, now: float) -> None:
    """``total`` tokens have arrived by ``now``: spread the new ones over the gap."""
    new = total - len(res.token_times)
    if new <= 0:
        return
    if not res.token_times:
        res.token_times.extend([now] * new)
        return
    last = res.token_times[-1]
    res.token_times.extend(last + (now - last) * (i + 1) / new for i in range(new))


# --- spec parsing ------------------------------------------------------------------------

@dataclass
class TargetSpec:
    kind: str
    location: str                     # URL or checkpoint directory
    options: dict[str, str]
    text: str

    @property
    def label(self) -> str:
        if "label" in self.options:
            return self.options["label"]
        if self.kind == "url":        # until started: then the served model's name (bench cli)
            return self.location.split("://", 1)[-1].rstrip("/")
        return Path(self.location.rstrip("/")).name or self.location


def parse_target(text: str) -> TargetSpec:
    """``[KIND:]LOCATION[?key=value&...]`` -> TargetSpec (raises BenchError)."""
    rest, options = text, {}
    if "?" in rest:
        rest, q = rest.rsplit("?", 1)
        options = dict(parse_qsl(q, keep_blank_values=True))
    kind, sep, loc = rest.partition(":")
    if sep and kind in KINDS:
        location = loc
    elif rest.startswith(("http://", "https://")):
        kind, location = "url", rest
    else:
        kind, location = "spawn", rest
    if not location:
        raise BenchError(f"--target {text}: nothing after '{kind}:'")
    if kind == "url" and not location.startswith(("http://", "https://")):
        raise BenchError(f"--target {text}: a url target needs http:// or https://")
    if kind in ("spawn", "engine") and not (Path(location) / "config.json").is_file():
        raise BenchError(f"--target {text}: {location} is not a checkpoint directory (no config.json)")
    for key in ("tokenizer", "dir"):
        if key in options and not Path(options[key]).is_dir():
            raise BenchError(f"--target {text}: {key}={options[key]} is not a directory")
    if options.get("backend", "native") not in ("native", "vllm"):
        raise BenchError(f"--target {text}: backend must be native or vllm")
    return TargetSpec(kind, location, options, text)


def make_target(spec: TargetSpec, request_timeout: float = 600.0) -> Target:
    if spec.kind == "url":
        return OpenAITarget(spec, request_timeout)
    if spec.kind == "spawn":
        return SpawnTarget(spec, request_timeout)
    return EngineTarget(spec)


# --- targets -------------------------------------------------------------------------------

class Target:
    """Start, describe, generate, stop. ``info`` is filled by ``start``."""

    kind = "?"

    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self.label = spec.label
        self.info: dict = {}
        self._tokenizer = None

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        pass

    async def generate(self, prompt_ids: list[int], max_tokens: int, token_ids: bool = False) -> RequestResult:
        """Greedy, EOS ignored: exactly ``max_tokens`` tokens unless something fails;
        ``token_ids``: the result must carry the generated ids (tokens without text)."""
        raise NotImplementedError

    # facts the suites need -------------------------------------------------------------
    @property
    def model_dir(self) -> str | None:
        """The checkpoint directory, where known (for model facts: weights, state)."""
        d = self.spec.options.get("dir") or self.info.get("model_dir")
        return d if d and (Path(d) / "config.json").is_file() else None

    @property
    def tokenizer_dir(self) -> str | None:
        d = self.spec.options.get("tokenizer") or self.model_dir
        return d if d and any((Path(d) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else None

    @property
    def max_model_len(self) -> int | None:
        return self.info.get("max_model_len")

    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_dir is None:
                raise BenchError(f"target {self.label}: no tokenizer known; add ?tokenizer=DIR to its --target")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, trust_remote_code=False)
        return self._tokenizer

    def describe(self) -> dict:
        return {"label": self.label, "kind": self.kind, "spec": self.spec.text, **self.info}


class OpenAITarget(Target):
    kind = "url"

    def __init__(self, spec: TargetSpec, request_timeout: float = 600.0):
        super().__init__(spec)
        self.base_url = spec.location.rstrip("/").removesuffix("/v1")
        self.request_timeout = request_timeout
        self.model_name = spec.options.get("model")
        key = spec.options.get("api_key") or os.environ.get("OPENAI_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=self.headers,
                                        timeout=httpx.Timeout(self.request_timeout, connect=30.0),
                                        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=1024))
        try:
            r = await self.client.get("/v1/models")
            r.raise_for_status()
            cards = r.json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as e:
            raise BenchError(f"target {self.label}: GET {self.base_url}/v1/models failed: {e}") from None
        if not cards:
            raise BenchError(f"target {self.label}: {self.base_url}/v1/models lists no model")
        card = next((c for c in cards if c.get("id") == self.model_name), None) if self.model_name else cards[0]
        if card is None:
            raise BenchError(f"target {self.label}: the server does not serve model {self.model_name!r} "
                             f"(it serves {', '.join(c.get('id', '?') for c in cards)})")
        self.model_name = card["id"]
        root = card.get("root")
        self.info = {"base_url": self.base_url, "model": self.model_name,
                     "model_dir": root if root and (Path(root) / "config.json").is_file() else None,
                     "max_model_len": card.get("max_model_len"), "server": card.get("owned_by"),
                     "engine": dict(card.get("statex") or {})}
        if "device" in self.spec.options:   # a server that does not say (vLLM's): where it runs, if told
            self.info["engine"].setdefault("device", self.spec.options["device"])

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def generate(self, prompt_ids: list[int], max_tokens: int, token_ids: bool = False) -> RequestResult:
        """One greedy completion streamed from ``/v1/completions``, every chunk timed as it arrives;
        ``token_ids``: the ids too, named in logprobs (vLLM's ``return_tokens_as_token_ids``)."""
        body = {"model": self.model_name, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        if token_ids:   # only when asked: logprobs cost time in the latency suite
            body |= {"logprobs": 0, "return_tokens_as_token_ids": True}
        res = RequestResult(prompt_tokens=len(prompt_ids), token_ids=[] if token_ids else None)
        counted = 0                       # tokens seen through chunks without usage
        parts: list[str] = []
        t0 = time.perf_counter()
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    detail = (await r.aread()).decode(errors="replace")[:300]
                    res.error = f"HTTP {r.status_code}: {detail}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter() - t0
                    chunk = json.loads(data)
                    if "error" in chunk:
                        res.error = str(chunk["error"].get("message", chunk["error"]))[:300]
                        break
                    choices = chunk.get("choices") or []
                    usage = chunk.get("usage")
                    for c in choices:
                        parts.append(c.get("text") or "")
                        res.finish_reason = c.get("finish_reason") or res.finish_reason
                        if token_ids:
                            res.token_ids += _named_ids((c.get("logprobs") or {}).get("tokens") or [])
                    if choices:
                        res.chunks += 1
                        counted += 1
                    total = usage["completion_tokens"] if usage else counted
                    if total > len(res.token_times):
                        if res.ttft is None:
                            res.ttft = now
                        _add_tokens(res, total, now)
                    if usage:
                        res.completion_tokens = usage["completion_tokens"]
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            res.error = f"{type(e).__name__}: {e}"[:300]
        res.e2e = time.perf_counter() - t0
        res.completion_tokens = max(res.completion_tokens, len(res.token_times))
        res.text = "".join(parts)
        if res.error is None and res.ttft is None:
            res.error = "the stream ended without a token"
        if token_ids and res.error is None and len(res.token_ids) != res.completion_tokens:
            res.error = (f"asked for token ids, got {len(res.token_ids)} for {res.completion_tokens} tokens "
                         "(does the server support return_tokens_as_token_ids?)")
        return res


def _named_ids(tokens: list[str]) -> list[int]:
    """``["token_id:42", ...]`` -> ``[42, ...]``; a token not named by id is -1 (never a match)."""
    out = []
    for t in tokens:
        name, _, n = str(t).partition(":")
        out.append(int(n) if name == "token_id" and n.isdigit() else -1)
    return out


_SPAWN_OWN = {"label", "model", "tokenizer", "dir", "api_key", "backend"}


class SpawnTarget(OpenAITarget):
    kind = "spawn"

    def __init__(self, spec: TargetSpec, request_timeout: float = 600.0):
        url_spec = TargetSpec("url", "http://127.0.0.1:0", spec.options, spec.text)
        super().__init__(url_spec, request_timeout)
        self.spec = spec
        self.label = spec.label
        extra = ["--backend", spec.options.get("backend", "native"), "--log-level", "warning"]
        for k, v in spec.options.items():
            if k not in _SPAWN_OWN:
                extra += [f"--{k.replace('_', '-')}", v] if v != "" else [f"--{k.replace('_', '-')}"]
        self.server = ServerProcess(spec.location, *extra, startup_timeout=300.0)
        self.base_url = self.server.base_url

    async def start(self) -> None:
        self.server.launch()
        try:
            await asyncio.to_thread(self.server.wait_ready)
        except RuntimeError:
            tail = self.server.log_tail(2000).strip().splitlines()
            self.server.stop()
            raise BenchError(f"statex-serve --model {self.spec.location} did not start: "
                             f"{tail[-1] if tail else '(no output)'}") from None
        try:
            await super().start()
        except BaseException:
            self.server.stop()
            raise
        self.info["command"] = " ".join(self.server.proc.args)

    async def stop(self) -> None:
        await super().stop()
        self.server.stop()
        self.server.log_path.unlink(missing_ok=True)


class EngineTarget(Target):
    """The engine in this process; tokens are timed as the engine hands them over."""

    kind = "engine"

    def __init__(self, spec: TargetSpec):
        super().__init__(spec)
        self.engine = None

    async def start(self) -> None:
        from statex_serve.engine import EngineArgs, create_engine

        fields = {k: v for k, v in self.spec.options.items() if k not in _SPAWN_OWN}
        kwargs = {}
        for k, v in fields.items():
            if k not in EngineArgs.__dataclass_fields__ or k == "model":
                raise BenchError(f"--target {self.spec.text}: {k} is not an engine argument")
            kwargs[k] = int(v) if v.isdigit() else v
        if "state_memory" in kwargs:
            from statex_serve.engine import parse_memory_size

            kwargs["state_memory"] = parse_memory_size(str(kwargs["state_memory"]))
        t0 = time.perf_counter()
        try:
            args = EngineArgs(model=self.spec.location, **kwargs)
            self.engine = await asyncio.to_thread(create_engine, args, self.spec.options.get("backend", "native"))
        except (ValueError, RuntimeError, OSError) as e:
            raise BenchError(f"target {self.label}: cannot build the engine: {e}") from None
        await self.engine.start()
        self._tokenizer = self.engine.tokenizer
        self.info = {"model": self.engine.model_name, "model_dir": self.engine.model_path,
                     "max_model_len": self.engine.max_model_len, "engine": self.engine.describe(),
                     "startup_s": time.perf_counter() - t0}   # load, compile, autotune, capture

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()
            self.engine = None

    async def generate(self, prompt_ids: list[int], max_tokens: int, token_ids: bool = False) -> RequestResult:
        """One greedy request through the engine, tokens timed as it hands them over (always with their ids)."""
        from statex_serve.engine import EngineError, GenerationRequest, SamplingParams

        res = RequestResult(prompt_tokens=len(prompt_ids), token_ids=[])
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        parts: list[str] = []
        t0 = time.perf_counter()
        try:
            stream = self.engine.generate(GenerationRequest(f"bench-{uuid.uuid4().hex}", list(prompt_ids), params))
            async for out in stream:
                now = time.perf_counter() - t0
                for d in out.outputs:
                    if d.token_ids:
                        if res.ttft is None:
                            res.ttft = now
                        res.token_ids.extend(d.token_ids)
                        _add_tokens(res, len(res.token_ids), now)
                    parts.append(d.text)
                    res.finish_reason = d.finish_reason or res.finish_reason
                res.chunks += 1
        except EngineError as e:
            res.error = f"{type(e).__name__}: {e}"[:300]
        res.e2e = time.perf_counter() - t0
        res.completion_tokens = len(res.token_ids)
        res.text = "".join(parts)
        if res.error is None and res.ttft is None:
            res.error = "the engine finished without a token"
        return res
