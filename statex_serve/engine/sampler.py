"""Next-token sampling for a batch of sequences, each with its own parameters.

Greedy rows take the argmax (the same rule as ``model.greedy_generate``, so
greedy outputs can be compared with it token for token). Random rows sample
from softmax(logits / temperature) restricted by top-k and top-p, with the
exponential-race trick (argmax of p / q, q ~ Exp(1)) drawn from the row's own
``torch.Generator``: a seeded request gets the same tokens whatever else is in
the batch. Logprobs are the model's (log-softmax of the raw logits).

Before either, the logits are adjusted (only when some row asks): logit_bias,
banned tokens (stop tokens before min_tokens), then vLLM's penalties:
repetition over prompt and output tokens (a seen token's logit divided by the
penalty when positive, multiplied when not), frequency (times the token's
count) and presence (once) over output tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from statex_serve.engine.base import SamplingSwitches, TokenLogprob


class PenaltyHistory:
    """A sequence's tokens as the penalties see them, kept on the device: the
    prompt's presence mask (built once) and the output's counts (updated with
    the tokens added since the last step), so a step costs no prompt-length work."""

    def __init__(self, prompt_ids: Sequence[int], output_ids: Sequence[int]):
        self.prompt_ids = prompt_ids          # only read when repetition_penalty != 1
        self.output_ids = output_ids          # the sequence's own list: grows as it generates
        self._prompt_mask: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._counted = 0

    def prompt_mask(self, vocab: int, device) -> torch.Tensor:
        if self._prompt_mask is None:
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            if len(self.prompt_ids):
                mask[torch.as_tensor(list(self.prompt_ids), device=device)] = True
            self._prompt_mask = mask
        return self._prompt_mask

    def output_counts(self, vocab: int, device) -> torch.Tensor:
        if self._counts is None:
            self._counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        new = self.output_ids[self._counted:]
        if new:
            ids = torch.as_tensor(list(new), device=device)
            self._counts.index_add_(0, ids, torch.ones(len(new), device=device))
            self._counted += len(new)
        return self._counts


@dataclass
class SamplingRow(SamplingSwitches):
    """What the sampler needs to know about one sequence for one step."""

    temperature: float = 0.0                 # < 1e-5: greedy
    top_p: float = 1.0
    top_k: int = 0                           # <= 0: off
    generator: torch.Generator | None = None  # required for random rows
    logprobs: int | None = None              # top-k alternatives to report (0: the chosen token only)
    banned_token_ids: tuple[int, ...] = ()   # e.g. stop tokens before min_tokens
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    history: PenaltyHistory | None = None    # required when a penalty is on


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None] = field(default_factory=list)


# --seed: the seeds of sequences that ask for none are drawn from this (a run
# with the same requests in the same order samples the same); None: OS entropy
_server_seeds: torch.Generator | None = None


def set_server_seed(seed: int | None) -> None:
    global _server_seeds
    _server_seeds = None if seed is None else torch.Generator().manual_seed(seed % (1 << 63))


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator for one sequence: seeded when asked, else from the server's
    seed (--seed) or fresh OS entropy."""
    g = torch.Generator(device=device)
    if seed is None and _server_seeds is not None:
        seed = int(torch.randint(0, 2**62, (1,), generator=_server_seeds))
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % (1 << 63))
    return g


def _adjust_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Biases, bans and penalties, applied to a copy only when some row has them."""
    penalized = [i for i, r in enumerate(rows) if r.penalized]
    if not (penalized or any(r.banned_token_ids or r.logit_bias for r in rows)):
        return logits
    logits = logits.clone()
    for i, r in enumerate(rows):
        if r.logit_bias:
            ids = torch.tensor([t for t, _ in r.logit_bias], device=logits.device)
            logits[i, ids] += torch.tensor([b for _, b in r.logit_bias], device=logits.device, dtype=logits.dtype)
        if r.banned_token_ids:
            logits[i, list(r.banned_token_ids)] = float("-inf")
    if penalized:
        _apply_penalties_(logits, [rows[i] for i in penalized], penalized)
    return logits


def _apply_penalties_(logits: torch.Tensor, rows: list[SamplingRow], index: list[int]) -> None:
    """vLLM's penalties, in place, on the rows ``index`` (one batched op each)."""
    V, dev, dt = logits.shape[-1], logits.device, logits.dtype
    idx = torch.tensor(index, device=dev)
    sub = logits[idx]
    counts = torch.stack([r.history.output_counts(V, dev) for r in rows]).to(dt)        # [P, V]
    seen_out = counts > 0
    rep = torch.tensor([r.repetition_penalty for r in rows], device=dev, dtype=dt)[:, None]
    if bool((rep != 1).any()):
        seen = seen_out | torch.stack([r.history.prompt_mask(V, dev) if r.repetition_penalty != 1.0
                                       else torch.zeros(V, dtype=torch.bool, device=dev) for r in rows])
        factor = torch.where(seen, rep, torch.ones_like(rep))
        sub = torch.where(sub > 0, sub / factor, sub * factor)
    freq = torch.tensor([r.frequency_penalty for r in rows], device=dev, dtype=dt)[:, None]
    presence = torch.tensor([r.presence_penalty for r in rows], device=dev, dtype=dt)[:, None]
    sub = sub - freq * counts - presence * seen_out.to(dt)
    logits[idx] = sub


def _top_k_top_p_mask_(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in place, what top-k (k <= 0: off) and top-p (1: off) drop.
    The most likely token always survives."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, V)[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs           # mass of the strictly more likely tokens
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    logits.scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    """logits [B, V] (fp32) -> one token per row, plus logprobs where asked."""
    assert logits.shape[0] == len(rows), (logits.shape, len(rows))
    adjusted = _adjust_logits(logits, rows)
    tokens = adjusted.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        sub = adjusted[idx] / torch.tensor([rows[i].temperature for i in random_rows],
                                           device=logits.device, dtype=logits.dtype)[:, None]
        top_k = torch.tensor([rows[i].top_k for i in random_rows], device=logits.device)
        top_p = torch.tensor([rows[i].top_p for i in random_rows], device=logits.device, dtype=logits.dtype)
        if bool((top_k > 0).any()) or bool((top_p < 1).any()):
            sub = _top_k_top_p_mask_(sub, top_k, top_p)
        probs = sub.softmax(dim=-1)
        race = torch.empty_like(probs)
        for j, i in enumerate(random_rows):
            race[j].exponential_(generator=rows[i].generator)
        tokens[idx] = (probs / race).argmax(dim=-1)
    token_list = tokens.tolist()
    return SamplerOutput(token_list, _chosen_logprobs(logits, token_list, rows))


def _chosen_logprobs(logits: torch.Tensor, tokens: list[int], rows: list[SamplingRow]
                     ) -> list[TokenLogprob | None]:
    want = [i for i, r in enumerate(rows) if r.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if not want:
        return out
    idx = torch.tensor(want, device=logits.device)
    lp = logits[idx].log_softmax(dim=-1)
    chosen = lp.gather(1, torch.tensor([tokens[i] for i in want], device=logits.device)[:, None])[:, 0]
    k = max(rows[i].logprobs for i in want)
    top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    chosen, top_v, top_i = chosen.tolist(), top_v.tolist(), top_i.tolist()
    for j, i in enumerate(want):
        kk = rows[i].logprobs
        out[i] = TokenLogprob(tokens[i], chosen[j], list(zip(top_i[j][:kk], top_v[j][:kk])))
    return out


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """logits [T, V] where row t predicts ``targets[t]`` -> one entry per target."""
    if not targets:
        return []
    lp = logits[: len(targets)].log_softmax(dim=-1)
    tgt = torch.tensor(targets, device=logits.device)
    chosen = lp.gather(1, tgt[:, None])[:, 0].tolist()
    if k > 0:
        top_v, top_i = lp.topk(k, dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
    else:
        top_v = top_i = [[] for _ in targets]
    return [TokenLogprob(t, c, list(zip(ti, tv))) for t, c, ti, tv in zip(targets, chosen, top_i, top_v)]
