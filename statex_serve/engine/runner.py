"""Runs the model over the state pool: batched decode, variable-length prefill,
state copies. Owns the device tensors; knows nothing about requests.

On CUDA, decode is captured in CUDA graphs, one per batch-size bucket (1, 2, 4,
8, then multiples of 8 up to the pool size): a decode step is then one graph
launch instead of hundreds of small kernel launches, which is what bounds a
small model's decode time. A batch is padded up to its bucket with slot -1 rows,
which the kernels skip (they neither read nor write any state for them).

Prefill is captured too (launched eagerly, a 1K prompt's prefill spends ~40 ms
on the host for ~7 ms of GPU work; H200, docs/perf.md): one prompt segment per
token-count bucket (64, 96, 128, 192, ... up to the prefill chunk), and bursts
of several segments in S lanes of L tokens (``lane_buckets``). Each segment is
padded to its lane's end with rows that leave every state as it is
(``prefill(..., padded=True)`` in model_registry/base.py); the recurrences take
the lanes as a dense batch. A burst whose lanes would be mostly padding, and
every call that wants all logits, run as one eager variable-length call.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from model_registry.state import StatePools

logger = logging.getLogger(__name__)


def decode_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes + [max_batch]))


class _DecodeGraphs:
    """Captured decode graphs over static input buffers (CUDA only)."""

    @torch.inference_mode()
    def __init__(self, model, pools: StatePools, max_batch: int, device: torch.device):
        self.buckets = decode_buckets(max_batch)
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.full((max_batch,), -1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        mempool = torch.cuda.graph_pool_handle()
        # Warm up outside capture (Triton compiles, cuBLAS picks kernels); with
        # every slot -1 no state is touched.
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for b in self.buckets:
                model.decode(self.ids[:b], self.slots[:b], pools)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        for b in reversed(self.buckets):          # largest first: smaller graphs reuse its memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                out = model.decode(self.ids[:b], self.slots[:b], pools)
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize(device)

    def run(self, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        b = len(ids)
        bucket = next(x for x in self.buckets if x >= b)
        self.ids[:b].copy_(ids)
        self.slots[:b].copy_(slots)
        self.slots[b:bucket].fill_(-1)
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:b]


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token counts with a captured one-prompt prefill: 64 x 2^k and 96 x 2^k (at
    most 1.5x padding above 64 tokens), then ``max_tokens`` itself."""
    sizes = [m * 2 ** k for k in range(16) for m in (64, 96) if m * 2 ** k < max_tokens]
    return sorted(sizes + [max_tokens]) if max_tokens > 0 else []


# Bursts (several prompt segments in one prefill call) get graphs of S lanes of L
# tokens: S in LANE_COUNTS, L a power of two from MIN_LANE_TOKENS with S x L within
# the prefill chunk (15 graphs at the CUDA default of 8192 tokens).
LANE_COUNTS = (2, 4, 8)
MIN_LANE_TOKENS = 128
# A burst takes its lanes graph when the padded token count is at most
# LANE_PADDING x its real one, or at most LANE_FREE_TOKENS whatever the padding: the
# eager call it replaces spends ~35-70 ms on the host launching kernels (H200:
# 8 x 1K prompts eagerly 56.8 ms for GLA, 89.5 ms for Mamba2, against 53 / 70 ms
# for one 8K-token graph), which pays for a few thousand padding tokens.
LANE_PADDING = 1.25
LANE_FREE_TOKENS = 4096


def lane_buckets(max_tokens: int) -> list[tuple[int, int]]:
    """(lanes, tokens per lane) of the captured burst prefills, fewest tokens first."""
    out = []
    for lanes in LANE_COUNTS:
        length = MIN_LANE_TOKENS
        while lanes * length <= max_tokens:
            out.append((lanes, length))
            length *= 2
    return sorted(out, key=lambda b: (b[0] * b[1], b[0]))


class _PrefillGraphs:
    """Captured prefills over static buffers (CUDA only), of S prompts in S lanes of
    L tokens each (``model.prefill(..., padded=True)``): one prompt (S = 1) at every
    token bucket, bursts at ``lane_buckets``. A prompt of T tokens fills the first T
    rows of its lane and padding the rest (``cu`` = [0, T_0, L, L + T_1, ...], slots
    [slot_0, -1, slot_1, -1, ...]); a lane without a prompt has T = 0 and slot -1."""

    @torch.inference_mode()
    def __init__(self, model, pools: StatePools, max_tokens: int, device: torch.device):
        self.buckets = prefill_buckets(max_tokens)           # one-prompt token counts
        self.keys = [(1, b) for b in self.buckets] + lane_buckets(max_tokens)
        self.ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        # per key: cu [2S + 1] int32, slots [2S] int32, has_init [2S] bool (filled before each replay)
        self.meta = {(s, n): (self._cu([1] * s, n).to(device),
                              torch.full((2 * s,), -1, dtype=torch.int32, device=device),
                              torch.zeros(2 * s, dtype=torch.bool, device=device)) for s, n in self.keys}
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

        def run(key):     # slot -1 everywhere: warm-up and capture touch no state
            cu, slots, has_init = self.meta[key]
            return model.prefill(self.ids[:key[0] * key[1]], cu, slots, has_init, pools, padded=True)

        mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):        # compile and autotune outside capture
            for key in self.keys:
                run(key)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        for key in sorted(self.keys, key=lambda k: -k[0] * k[1]):   # largest first: smaller graphs reuse its memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                out = run(key)
            self.graphs[key] = (graph, out)
        torch.cuda.synchronize(device)

    @staticmethod
    def _cu(lens: list[int], lane: int) -> torch.Tensor:
        cu = [0]
        for i, n in enumerate(lens):
            cu += [i * lane + n, (i + 1) * lane]
        return torch.tensor(cu, dtype=torch.int32)

    def fits(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.buckets[-1]

    def key_for(self, seq_lens: list[int]) -> tuple[int, int] | None:
        """The graph a prefill of these segments replays, or None (eager): one segment
        its token bucket; several the smallest lanes graph that holds them, if its
        padding is worth it (LANE_PADDING, LANE_FREE_TOKENS)."""
        if not seq_lens or min(seq_lens) <= 0:
            return None
        if len(seq_lens) == 1:
            return (1, next(b for b in self.buckets if b >= seq_lens[0])) if self.fits(seq_lens[0]) else None
        longest, total = max(seq_lens), sum(seq_lens)
        for lanes, length in self.keys:
            if lanes >= len(seq_lens) and length >= longest and lanes > 1:
                padded = lanes * length
                return (lanes, length) if padded <= max(LANE_PADDING * total, LANE_FREE_TOKENS) else None
        return None

    def run(self, key: tuple[int, int], token_ids: list[int], seq_lens: list[int], slots: list[int],
            has_initial_state: list[bool]) -> torch.Tensor:
        """The segments' last logits [len(seq_lens), V]; their slots' states advance."""
        lanes, length = key
        n = len(seq_lens)
        ids, start = [], 0
        for t in seq_lens:        # each prompt, then padding to its lane's end (any id: it changes no state)
            ids += token_ids[start:start + t]
            ids += [0] * (length - t)
            start += t
        cu, slot_t, init_t = self.meta[key]
        self.ids[:n * length].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)   # unused lanes: T = 0
        cu.copy_(self._cu(list(seq_lens) + [0] * (lanes - n), length), non_blocking=True)
        slot_t.copy_(torch.tensor([x for s in list(slots) + [-1] * (lanes - n) for x in (s, -1)],
                                  dtype=torch.int32), non_blocking=True)
        init_t.copy_(torch.tensor([x for c in list(has_initial_state) + [False] * (lanes - n) for x in (c, False)]),
                     non_blocking=True)
        graph, out = self.graphs[key]
        graph.replay()
        return out[:n].clone()                 # the next replay of this key overwrites out


class ModelRunner:
    def __init__(self, model, num_slots: int, device: torch.device, state_dtype: torch.dtype | None,
                 cuda_graphs: bool = True, prefill_graph_tokens: int = 0):
        self.model = model
        self._host_tokens: torch.Tensor | None = None     # pinned: argmax_to_host's landing place
        self.device = device
        self.pools: StatePools = model.allocate_state_pools(num_slots, device=device, state_dtype=state_dtype)
        self.graphs: _DecodeGraphs | None = None
        self.prefill_graphs: _PrefillGraphs | None = None
        if device.type == "cuda" and cuda_graphs and os.environ.get("STATEX_CUDA_GRAPHS", "1") != "0":
            try:
                t0 = time.perf_counter()
                logger.info("warm-up: decode (compile, then capture CUDA graphs for %d batch sizes)...",
                            len(decode_buckets(num_slots)))
                self.graphs = _DecodeGraphs(model, self.pools, num_slots, device)
                logger.info("warm-up: decode captured in CUDA graphs for batch sizes %s in %.1fs",
                            self.graphs.buckets, time.perf_counter() - t0)
            except Exception:   # a kernel that cannot be captured must not stop the server
                logger.exception("CUDA graph capture failed; decoding eagerly")
                self.graphs = None
            if prefill_graph_tokens > 0 and model.supports_padded_prefill:
                self._capture_prefill(prefill_graph_tokens)

    def _capture_prefill(self, max_tokens: int) -> None:
        t0 = time.perf_counter()
        logger.info("warm-up: prefill (compile, then capture CUDA graphs: one prompt at %d token counts up to %d, "
                    "bursts at %d lanes x tokens)...", len(prefill_buckets(max_tokens)), max_tokens,
                    len(lane_buckets(max_tokens)))
        try:
            self.prefill_graphs = _PrefillGraphs(self.model, self.pools, max_tokens, self.device)
            logger.info("warm-up: prefill captured in CUDA graphs for one prompt of %s tokens and bursts of %s "
                        "(lanes x tokens) in %.1fs", self.prefill_graphs.buckets,
                        " ".join(f"{a}x{b}" for a, b in lane_buckets(max_tokens)), time.perf_counter() - t0)
        except Exception:       # as for decode: serve, eagerly
            logger.exception("CUDA graph capture of prefill failed; prefilling eagerly")
            self.prefill_graphs = None

    def _ints(self, values: list[int], dtype=torch.int32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def decode(self, token_ids: list[int] | torch.Tensor, slots: list[int]) -> torch.Tensor:
        """One token per sequence (a list, or ids already on the device) -> logits
        [B, V] (fp32); states advance in place."""
        ids = token_ids if isinstance(token_ids, torch.Tensor) else self._ints(token_ids, torch.long)
        slot_t = self._ints(slots)
        if self.graphs is not None:
            return self.graphs.run(ids, slot_t)
        return self.model.decode(ids, slot_t, self.pools)

    @torch.inference_mode()
    def argmax_to_host(self, logits: torch.Tensor):
        """The greedy tokens of ``logits`` [B, V]: (the tokens on the device, a
        function that returns them as a list). The copy to the host is queued
        now, so the function waits for this step only, not for work queued
        after this call (such as the next step's graph)."""
        tokens = logits.argmax(dim=-1)
        if self.device.type != "cuda":
            return tokens, tokens.tolist
        if self._host_tokens is None or len(self._host_tokens) < len(tokens):
            self._host_tokens = torch.empty(max(len(tokens), self.pools.num_slots), dtype=torch.long,
                                            pin_memory=True)
        host = self._host_tokens[:len(tokens)]
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def read() -> list[int]:
            copied.synchronize()
            return host.tolist()
        return tokens, read

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], seq_lens: list[int], slots: list[int], has_initial_state: list[bool],
                all_logits: bool = False) -> torch.Tensor:
        """Prompt segments (flattened) -> logits of each segment's last token [B, V],
        or of every token [N_tok, V] with ``all_logits``."""
        graphs = self.prefill_graphs
        key = graphs.key_for(seq_lens) if graphs is not None and not all_logits else None
        if key is not None:
            return graphs.run(key, token_ids, seq_lens, slots, has_initial_state)
        return self._prefill_eager(token_ids, seq_lens, slots, has_initial_state, all_logits)

    def _prefill_eager(self, token_ids, seq_lens, slots, has_initial_state, all_logits=False) -> torch.Tensor:
        """One variable-length call over every segment."""
        cu = [0]
        for n in seq_lens:
            cu.append(cu[-1] + n)
        return self.model.prefill(self._ints(token_ids, torch.long), self._ints(cu), self._ints(slots),
                                  torch.tensor(has_initial_state, dtype=torch.bool).to(self.device),
                                  self.pools, all_logits=all_logits)

    def prefill_warmup_batches(self, max_tokens: int) -> list[list[int]]:
        """Prompt-segment lengths that together reach every compiled variant of
        prefill: one sequence (the libraries' dense path) and several (their
        varlen path, 2, 3 and 16 of them); token and chunk counts of 1, of a
        multiple of 16 and of neither (Triton specialises integer arguments on
        both); up to the largest segment."""
        big = max(200, max_tokens)
        batches = [[1], [16], [17], [100], [1024], [big - 100], [big],
                   [16, 16], [1, 17, 16], [17] * 16, [big // 2, big - big // 2]]
        return [b for b in batches if len(b) <= self.pools.num_slots]

    @torch.inference_mode()
    def warm_up_prefill(self, max_tokens: int, vocab_size: int) -> int:
        """Run every prefill variant once (fresh and carried state, last-token and
        all logits), so that no request pays a compile or an autotune. Uses
        slots 0.. and leaves them dirty: a request's first segment never reads
        its slot's old state. Returns how many prefill calls it made."""
        calls = 0
        for lens in self.prefill_warmup_batches(max_tokens):
            n = len(lens)
            ids = torch.randint(0, vocab_size, (sum(lens),)).tolist()
            modes = [[False] * n, [True] * n] + ([[i % 2 == 1 for i in range(n)]] if n > 1 else [])
            for carried in modes:
                # all logits only change the last layer's tail, which has no shape-specialised kernel
                for all_logits in ((False, True) if sum(lens) <= 64 else (False,)):
                    # eagerly: the prefill graphs were compiled when they were captured
                    self._prefill_eager(ids, lens, list(range(n)), carried, all_logits=all_logits)
                    calls += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return calls

    @torch.inference_mode()
    def copy_state(self, src: int, dst: int) -> None:
        self.pools.copy_slot_(src, dst)
