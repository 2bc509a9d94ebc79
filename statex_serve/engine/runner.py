"""Runs the model over the state pool: batched decode, variable-length prefill,
state copies. Owns the device tensors; knows nothing about requests.

On CUDA, decode is captured in CUDA graphs, one per batch-size bucket (1, 2, 4,
8, then multiples of 8 up to the pool size): a decode step is then one graph
launch instead of hundreds of small kernel launches, which is what bounds a
small model's decode time. A batch is padded up to its bucket with slot -1 rows,
which the kernels skip (they neither read nor write any state for them).

A prefill of one prompt segment is captured too, one graph per token-count
bucket (64, 96, 128, 192, ... up to the prefill chunk): launched eagerly, a 1K
prompt's prefill spends ~40 ms on the host for ~7 ms of GPU work (H200, docs/perf.md).
The segment is padded up to its bucket with rows that leave every state as it is
(``prefill(..., padded=True)`` in model_registry/base.py). Several segments
prefilled in one call (a burst of prompts) take one eager variable-length call:
replaying each segment's graph in turn (``graph_bursts=True``) was measured no
faster on the H200 (8 x 1K: 60.6 against 56.8 ms for GLA, 89.0 against 89.5 ms
for Mamba2; padding to the buckets makes it slower at other lengths;
``scripts/profile_step.py --burst``, docs/perf.md).
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
    """Token counts with a captured prefill: 64 x 2^k and 96 x 2^k (at most 1.5x
    padding above 64 tokens), then ``max_tokens`` itself."""
    sizes = [m * 2 ** k for k in range(16) for m in (64, 96) if m * 2 ** k < max_tokens]
    return sorted(sizes + [max_tokens]) if max_tokens > 0 else []


class _PrefillGraphs:
    """Captured one-segment prefills over static buffers (CUDA only): the prompt's
    ids, then padding up to the bucket (``cu`` = [0, T, bucket], slots [slot, -1])."""

    @torch.inference_mode()
    def __init__(self, model, pools: StatePools, max_tokens: int, device: torch.device):
        self.buckets = prefill_buckets(max_tokens)
        self.ids = torch.zeros(self.buckets[-1], dtype=torch.long, device=device)
        self.slots = torch.full((2,), -1, dtype=torch.int32, device=device)
        self.has_init = torch.zeros(2, dtype=torch.bool, device=device)
        self.cu = {b: torch.tensor([0, 1, b], dtype=torch.int32, device=device) for b in self.buckets}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

        def run(b):     # slot -1: warm-up and capture touch no state
            return model.prefill(self.ids[:b], self.cu[b], self.slots, self.has_init, pools, padded=True)

        mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):        # compile and autotune outside capture
            for b in self.buckets:
                run(b)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        for b in reversed(self.buckets):       # largest first: smaller graphs reuse its memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                out = run(b)
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize(device)

    def fits(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.buckets[-1]

    def run(self, ids: list[int], slot: int, has_initial_state: bool) -> torch.Tensor:
        """The prompt's ids -> its last token's logits [1, V]; the slot's state advances."""
        T = len(ids)
        bucket = next(x for x in self.buckets if x >= T)
        # straight into the static buffer; the rows after T keep old ids: padding ignores them
        self.ids[:T].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        self.cu[bucket][1].fill_(T)
        self.slots[0].fill_(slot)
        self.has_init[0].fill_(has_initial_state)
        graph, out = self.graphs[bucket]
        graph.replay()
        return out.clone()                     # the next replay of this bucket overwrites out


class ModelRunner:
    def __init__(self, model, num_slots: int, device: torch.device, state_dtype: torch.dtype | None,
                 cuda_graphs: bool = True, prefill_graph_tokens: int = 0, graph_bursts: bool = False):
        self.model = model
        self.graph_bursts = graph_bursts
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
        logger.info("warm-up: one-segment prefill (compile, then capture CUDA graphs for %d token counts up "
                    "to %d)...", len(prefill_buckets(max_tokens)), max_tokens)
        try:
            self.prefill_graphs = _PrefillGraphs(self.model, self.pools, max_tokens, self.device)
            logger.info("warm-up: one-segment prefill captured in CUDA graphs for %s tokens in %.1fs",
                        self.prefill_graphs.buckets, time.perf_counter() - t0)
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
        if graphs is not None and not all_logits and (len(seq_lens) == 1 or self.graph_bursts) \
                and all(graphs.fits(n) for n in seq_lens):
            return self._prefill_graphed(token_ids, seq_lens, slots, has_initial_state)
        return self._prefill_eager(token_ids, seq_lens, slots, has_initial_state, all_logits)

    def _prefill_eager(self, token_ids, seq_lens, slots, has_initial_state, all_logits=False) -> torch.Tensor:
        """One variable-length call over every segment."""
        cu = [0]
        for n in seq_lens:
            cu.append(cu[-1] + n)
        return self.model.prefill(self._ints(token_ids, torch.long), self._ints(cu), self._ints(slots),
                                  torch.tensor(has_initial_state, dtype=torch.bool).to(self.device),
                                  self.pools, all_logits=all_logits)

    def _prefill_graphed(self, token_ids, seq_lens, slots, has_initial_state) -> torch.Tensor:
        """Each segment through its token bucket's graph, one after another."""
        rows, start = [], 0
        for n, slot, carried in zip(seq_lens, slots, has_initial_state):
            rows.append(self.prefill_graphs.run(token_ids[start:start + n], slot, carried))
            start += n
        return rows[0] if len(rows) == 1 else torch.cat(rows)

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
