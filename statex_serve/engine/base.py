"""The engine interface: what the API, the bench and the tests talk to, whichever
engine runs (the built-in ``NativeEngine`` or the ``VLLMEngine`` adapter).
The contract a caller meets, from construction to the last delta: docs/engine.md.
"""
from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

# Generated-token and prompt-token logprobs: at most this many alternatives per
# position by default (OpenAI allows 20 for chat's top_logprobs; vLLM's
# --max-logprobs default is 20 too); ``--max-logprobs`` changes it.
MAX_LOGPROBS = 20
# n above this is refused whatever the pool size (a guard against typos).
MAX_N = 128
# Stop strings are matched against the text after every token, and the text
# that could start one is held back: their cost per token grows with their
# number times their length, so both are bounded (OpenAI allows 4 strings).
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
# top_k beyond the vocabulary means "off"; a bound keeps it a machine integer.
MAX_TOP_K = 2**31 - 1
# vLLM takes any positive repetition_penalty; bounds keep the fp32 division and
# product finite (0 or inf would turn seen logits into inf or nan).
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-6, 1e6


# --- errors ---------------------------------------------------------------------------

class EngineError(Exception):
    """Base of the errors an engine raises to its callers."""


class InvalidRequestError(EngineError):
    """The request cannot be served as given (HTTP 400). ``param`` names the
    offending request field where there is one; ``code`` is a machine-readable
    reason (e.g. ``context_length_exceeded``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class EngineOverloadedError(EngineError):
    """The waiting queue is full (HTTP 503); retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class EngineDeadError(EngineError):
    """The engine has stopped (shut down, or its loop died) and serves nothing more."""


class RequestFailedError(EngineError):
    """The engine failed while running this request (HTTP 500); other requests go on."""


class PrefixNotFoundError(EngineError):
    """No pinned prefix has this id (HTTP 404)."""


def context_length_message(max_model_len: int, however: str, reduce: str = "the prompt or completion") -> str:
    """OpenAI's words for a request the context cannot hold (every error with
    code ``context_length_exceeded``); ``however`` says what the request asked for."""
    return (f"This model's maximum context length is {max_model_len} tokens. However, {however}. "
            f"Please reduce the length of {reduce}.")


def requested_tokens(num_prompt_tokens: int, max_tokens: int, num_prefix: int = 0) -> str:
    """``however`` for a prompt plus completion over the context (``num_prefix``:
    how many of the prompt tokens are a pinned prefix's)."""
    in_prompt = f"{num_prompt_tokens} in the prompt" + (
        f" ({num_prefix} of them the pinned prefix)" if num_prefix else "")
    return f"you requested {num_prompt_tokens + max_tokens} tokens ({in_prompt}, {max_tokens} in the completion)"


# --- requests -------------------------------------------------------------------------

class SamplingSwitches:
    """What the sampler derives from a row's knobs, the same for a request's
    ``SamplingParams`` and for the sampler's per-sequence ``SamplingRow``."""

    temperature: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class SamplingParams(SamplingSwitches):
    """How to generate for one request. Defaults follow OpenAI's completions API."""

    max_tokens: int = 16             # generated tokens per sequence; 0 only makes sense with prompt_logprobs
    temperature: float = 1.0         # 0: greedy
    top_p: float = 1.0               # nucleus mass kept, (0, 1]
    top_k: int = 0                   # keep the k most likely tokens; 0 (or -1): all
    min_tokens: int = 0              # stop tokens and stop strings are ignored before this many tokens
    seed: int | None = None          # sequence i of n samples with seed + i; None: fresh randomness
    n: int = 1                       # sequences per prompt (each its own state slot)
    stop: tuple[str, ...] = ()       # stop strings (excluded from the text unless include_stop_str_in_output)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token_id, bias) added to the logits before sampling
    # vLLM's penalties: presence / frequency over the generated tokens, repetition over prompt and generated
    presence_penalty: float = 0.0    # [-2, 2]: subtracted once from every token generated so far
    frequency_penalty: float = 0.0   # [-2, 2]: subtracted per occurrence among the generated tokens
    repetition_penalty: float = 1.0  # > 0: seen tokens' logits divided by it (positive) or multiplied (negative)
    logprobs: int | None = None      # per generated token: its logprob and this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    def check(self, vocab_size: int, max_n: int = MAX_N, max_logprobs: int = MAX_LOGPROBS) -> None:
        """The checks every engine makes; raises ``InvalidRequestError``."""
        if self.max_tokens < 0:
            raise InvalidRequestError(f"max_tokens must be at least 0, got {self.max_tokens}", "max_tokens")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise InvalidRequestError("max_tokens must be at least 1 (0 is allowed only to score a prompt "
                                      "with echo and logprobs)", "max_tokens")
        if not 1 <= self.n <= max_n:
            raise InvalidRequestError(f"n must be between 1 and {max_n}, got {self.n}", "n")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError(f"temperature must be between 0 and 2, got {self.temperature}",
                                      "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not -1 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequestError(f"top_k must be -1, 0 (off) or a positive number up to {MAX_TOP_K}, "
                                      f"got {self.top_k}", "top_k")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be between -2 and 2, got {getattr(self, name)}", name)
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidRequestError(f"repetition_penalty must be between {MIN_REPETITION_PENALTY:g} and "
                                      f"{MAX_REPETITION_PENALTY:g}, got {self.repetition_penalty}",
                                      "repetition_penalty")
        if self.seed is not None and not -2**63 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be a 64-bit integer, got {self.seed}", "seed")
        if self.min_tokens < 0 or self.min_tokens > max(self.max_tokens, 0):
            raise InvalidRequestError(f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), "
                                      f"got {self.min_tokens}", "min_tokens")
        for name, k in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if k is not None and not 0 <= k <= max_logprobs:
                raise InvalidRequestError(f"{name} must be between 0 and {max_logprobs} (this server's "
                                          f"--max-logprobs), got {k}", name)
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty", "stop")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}",
                                      "stop", "too_many_stop_strings")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(f"stop strings may have at most {MAX_STOP_STRING_CHARS} characters, got "
                                      f"one of {longest}", "stop", "stop_string_too_long")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise InvalidRequestError(f"stop token id {t} is outside the vocabulary [0, {vocab_size})",
                                          "stop_token_ids")
        for t, _ in self.logit_bias:
            if not 0 <= t < vocab_size:
                raise InvalidRequestError(f"logit_bias token id {t} is outside the vocabulary [0, {vocab_size})",
                                          "logit_bias")


@dataclass
class GenerationRequest:
    """One prompt, already tokenized. ``request_id`` must be unique among live requests.

    Prefix cache (engines with ``supports_prefix_cache``): ``prefix_id`` starts
    from a pinned prefix, the prompt being what follows it; ``pin_prefix=k``
    pins the state after the first k prompt tokens (after the pinned prefix, if
    any) and reports its id in ``RequestOutput.prefix_id``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)
    prefix_id: str | None = None
    pin_prefix: int | None = None
    # Prefix-cache scope: a request only hits and cuts at prefixes stored for
    # the same (cache_owner, cache_salt), so cached_tokens tell nothing about
    # other scopes' prompts; pinned prefixes belong to ``cache_owner`` (the
    # API key's namespace: other owners can neither see nor continue them).
    # None, None: the shared, unscoped cache.
    cache_owner: str | None = None
    cache_salt: str | None = None


# --- outputs --------------------------------------------------------------------------

@dataclass
class TokenLogprob:
    """One position: the chosen (or given) token's logprob and the top alternatives.

    Logprobs are those of the model's distribution (log-softmax of the raw
    logits), before temperature, top-k/top-p and logit_bias."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (token_id, logprob), most likely first


@dataclass
class SequenceDelta:
    """What one of a request's n sequences produced since the previous output."""

    index: int                                  # 0..n-1
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked for
    finish_reason: str | None = None            # "stop", "length" or "abort" on the sequence's last delta
    stop_reason: str | int | None = None        # the stop string or stop token id that ended it (None for EOS)


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[SequenceDelta]
    finished: bool                               # every sequence has finished; nothing follows
    num_prompt_tokens: int                       # a pinned prefix's tokens included
    # position 0 is None (nothing predicts the first token); sent once, on the
    # first output, when the request asked for prompt_logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0                   # prompt tokens restored from the prefix cache, not prefilled
    prefix_id: str | None = None                 # the prefix pinned for this request (pin_prefix)
    queue_time: float | None = None              # seconds from arrival to a state slot (None: not known)


@dataclass
class PrefixInfo:
    """A pinned prefix, as ``GET /v1/prefixes`` lists it."""

    id: str
    num_tokens: int
    bytes: int                                   # its state snapshot
    location: str                                # "device" or "host" (spilled)
    pinned: bool
    created: float                               # unix time
    last_used: float
    hits: int                                    # requests that started from it


class OutputStream:
    """The async iterator ``generate`` returns (point 3 of the contract): the
    engine puts ``RequestOutput`` deltas, or the exception that ends the
    request, on ``_queue``. Leaving early (``aclose``, a cancelled consumer, or
    dropping the stream) stops the request's work in the engine (``_stop``)."""

    # whether an exception from the engine also stops the request's remaining work
    abort_on_error = False

    def __init__(self):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._done = False

    def _stop(self) -> None:
        """Stop the request's work in the engine (it frees what the request holds)."""
        raise NotImplementedError

    def _ended(self) -> None:
        """The stream has ended (finished, failed or left): the engine's own bookkeeping."""

    def _taken(self) -> None:
        """The consumer has just taken an item off the queue."""

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:            # cancelled: whoever was listening is gone
            self._close(abort=True)
            raise
        self._taken()
        if isinstance(item, BaseException):
            self._close(abort=self.abort_on_error)
            raise item
        if item.finished:
            self._close(abort=False)
        return item

    async def aclose(self) -> None:
        self._close(abort=True)

    def _close(self, abort: bool) -> None:
        if self._done:
            return
        self._done = True
        self._ended()
        if abort:
            self._stop()

    def __del__(self):
        if not self._done:
            self._stop()


# --- stats ----------------------------------------------------------------------------

@dataclass
class EngineStats:
    """A snapshot for /metrics and the bench. Counters only grow."""

    running_requests: int = 0
    waiting_requests: int = 0
    slots_total: int = 0                 # state-pool capacity in sequences
    slots_used: int = 0
    state_bytes_per_sequence: int = 0
    state_pool_bytes: int = 0            # bytes the pool tensors hold
    prompt_tokens_total: int = 0         # prompt tokens prefilled
    generation_tokens_total: int = 0     # tokens sampled
    requests_finished_total: int = 0
    requests_aborted_total: int = 0
    steps_total: int = 0                 # engine steps (one decode batch + prefill chunks each)
    max_prefill_tokens_per_step: int = 0  # the largest prefill a step has run (bounded by prefill_chunk)
    extra: dict[str, Any] = field(default_factory=dict)   # engine-specific figures

    @property
    def slots_free(self) -> int:
        return self.slots_total - self.slots_used


# --- the interface --------------------------------------------------------------------

class Engine(abc.ABC):
    """What every engine offers. The contract: docs/engine.md."""

    @property
    @abc.abstractmethod
    def model_name(self) -> str:
        """The served name (what /v1/models lists and requests must name)."""

    @property
    def served_model_names(self) -> list[str]:
        """Every name requests may use; the first is ``model_name``."""
        return [self.model_name]

    @property
    @abc.abstractmethod
    def model_path(self) -> str:
        """Where the checkpoint was loaded from (the tokenizer lives there too)."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Prompt plus generated tokens allowed per sequence."""

    @property
    @abc.abstractmethod
    def tokenizer(self):
        """The Hugging Face tokenizer (``PreTrainedTokenizerBase``) of the model."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Valid token ids are ``range(vocab_size)`` (the model's embedding rows)."""

    @property
    def max_n(self) -> int:
        """The largest n one request may ask for."""
        return MAX_N

    @property
    def max_logprobs(self) -> int:
        """The most logprob alternatives per position a request may ask for."""
        return MAX_LOGPROBS

    def unhealthy_reason(self) -> str | None:
        """Why /health should answer 503 while the engine is alive (e.g. a step
        that has hung), or None."""
        return None

    @abc.abstractmethod
    async def start(self) -> None:
        ...

    @abc.abstractmethod
    async def shutdown(self) -> None:
        ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Check and queue ``request`` now; iterate the result for its outputs."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request and free its resources (thread-safe; unknown ids are ignored).
        A still-open stream ends with a ``finish_reason="abort"`` output."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        ...

    @property
    def is_alive(self) -> bool:
        """False once the engine can serve nothing more (/health answers 503)."""
        return True

    def describe(self) -> dict[str, Any]:
        """Facts for startup logs and /v1/models (backend, device, dtype, state sizes)."""
        return {}

    # --- pinned prefixes (engines with a prefix cache) ------------------------------------
    @property
    def supports_prefix_cache(self) -> bool:
        """Whether requests may use ``prefix_id`` / ``pin_prefix`` and the methods below work."""
        return False

    def prefix_info(self, prefix_id: str, owner: str | None = None) -> PrefixInfo:
        """A pinned prefix of ``owner`` (see ``GenerationRequest.cache_owner``);
        raises ``PrefixNotFoundError``."""
        raise PrefixNotFoundError(f"this engine keeps no prefixes (no prefix {prefix_id!r})")

    def list_prefixes(self, owner: str | None = None) -> list[PrefixInfo]:
        return []

    def delete_prefix(self, prefix_id: str, owner: str | None = None) -> PrefixInfo:
        """Unpin and drop a prefix of ``owner``; raises ``PrefixNotFoundError``."""
        raise PrefixNotFoundError(f"this engine keeps no prefixes (no prefix {prefix_id!r})")


class LoadedModelEngine(Engine):
    """The model facts both our engines answer the same way: names and path
    from ``self.args`` (``EngineArgs``), the rest from what loading the model
    set (``_max_model_len``, ``_tokenizer``, ``_vocab_size``); and the checks
    of a request before it is queued (``check_request``: live request ids are
    the keys of ``_streams``)."""

    args: Any
    _max_model_len: int
    _tokenizer: Any
    _vocab_size: int
    _streams: dict[str, Any]

    @property
    def model_name(self) -> str:
        return self.args.served_name

    @property
    def served_model_names(self) -> list[str]:
        return list(self.args.served_model_names) or [self.args.model]

    @property
    def model_path(self) -> str:
        return str(self.args.model)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_logprobs(self) -> int:
        return self.args.max_logprobs

    # --- the checks made before a request is queued -------------------------------------
    def check_request(self, request: GenerationRequest, num_prefix: int = 0) -> None:
        """Raise ``InvalidRequestError`` for a request this engine cannot serve,
        first problem first; ``num_prefix``: the tokens of the pinned prefix it
        continues (they count towards the context)."""
        if request.request_id in self._streams:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use", "request_id")
        self._refuse_unsupported(request)
        prompt = request.prompt_token_ids
        p = request.params
        if not prompt:
            raise InvalidRequestError("the prompt is empty: it needs at least one token", "prompt")
        bad = next((t for t in prompt if not (isinstance(t, int) and 0 <= t < self._vocab_size)), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {self._vocab_size})",
                                      "prompt")
        p.check(self._vocab_size, max_n=self.max_n, max_logprobs=self.max_logprobs)
        if request.pin_prefix is not None and not 1 <= request.pin_prefix <= len(prompt):
            raise InvalidRequestError(f"pin_prefix must be between 1 and the prompt's {len(prompt)} tokens, "
                                      f"got {request.pin_prefix}", "pin_prefix")
        self._refuse_beyond_limits(request)
        if num_prefix + len(prompt) + p.max_tokens > self._max_model_len:
            raise InvalidRequestError(
                context_length_message(self._max_model_len,
                                       requested_tokens(num_prefix + len(prompt), p.max_tokens, num_prefix)),
                "prompt", "context_length_exceeded")

    def _refuse_unsupported(self, request: GenerationRequest) -> None:
        """An engine's refusal of request fields it does not serve (checked before the prompt)."""

    def _refuse_beyond_limits(self, request: GenerationRequest) -> None:
        """An engine's own limits on otherwise valid requests (checked before the context length)."""

