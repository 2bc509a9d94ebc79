"""What both families share: the causal-LM shell around a stack of blocks,
with three execution paths over the same weights:

(a) ``forward``: whole sequences, chunked (training, scoring), optionally from
    and to per-sequence states;
(b) ``decode``: one token per sequence, states read and written in place in a
    ``StatePools`` addressed by slot;
(c) ``prefill``: variable-length prompts (flattened, ``cu_seqlens``) that start
    from their slot's state (or zero) and leave their final state there, after
    which (b) continues.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from model_registry.layers import project
from model_registry.state import StatePools, StateSpec


@dataclass
class StateXCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    # one dict per layer, the same keys as the state pools, each [B, *shape]
    states: list[dict[str, torch.Tensor]] | None = None


class StateXPreTrainedModel(PreTrainedModel):
    """Subclasses set ``self.embeddings``, ``self.layers``, ``self.final_norm``
    (property), ``self.lm_head`` and implement ``state_spec``."""

    supports_gradient_checkpointing = True
    _supports_cache_class = False
    _is_stateful = True

    # --- the family-specific pieces -------------------------------------------------
    @property
    def blocks(self):
        raise NotImplementedError

    @property
    def embeddings(self) -> torch.nn.Embedding:
        raise NotImplementedError

    @property
    def final_norm(self) -> torch.nn.Module:
        raise NotImplementedError

    def state_spec(self, state_dtype: torch.dtype | None = None) -> StateSpec:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        raise NotImplementedError("replace the embedding weights in place instead")

    def get_output_embeddings(self):
        return self.lm_head

    def allocate_state_pools(self, num_slots: int, device=None, state_dtype: torch.dtype | None = None
                             ) -> StatePools:
        return StatePools.allocate(self.state_spec(state_dtype), num_slots,
                                   device=device if device is not None else self.device)

    def fuse_projections_(self) -> None:
        """For serving, once the weights are in place (device and dtype final):
        projections that read the same input become one GEMM each (their
        weights become row views of one matrix; nothing is copied twice)."""
        for module in self.modules():
            if module is not self and hasattr(module, "fuse_projections_"):
                module.fuse_projections_()

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(h)
        return project(h.to(self.lm_head.weight.dtype), self.lm_head.weight, self.lm_head.bias).float()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                initial_states: list[dict[str, torch.Tensor]] | None = None,
                return_states: bool = False, attention_mask: torch.Tensor | None = None,
                **kwargs) -> StateXCausalLMOutput:
        """Path (a). ``labels`` follow the HF convention (shifted inside; -100 ignored)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding masks are not supported: pack sequences or run them separately")
        h = self.embeddings(input_ids)
        states = []
        for i, block in enumerate(self.blocks):
            h, st = block(h, initial_states[i] if initial_states is not None else None)
            states.append(st)
        logits = self._logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return StateXCausalLMOutput(loss=loss, logits=logits, states=states if return_states else None)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, slots: torch.Tensor,
                has_initial_state: torch.Tensor, pools: StatePools, all_logits: bool = False,
                padded: bool = False) -> torch.Tensor:
        """Path (c). input_ids [N_tok]; returns logits of each sequence's last token
        ``[B, vocab]`` (or of every token ``[N_tok, vocab]`` with ``all_logits``).

        ``padded``: prompts in lanes of equal length L, each prompt followed by
        padding up to its lane's end: for S lanes ``input_ids`` holds S x L rows,
        ``cu_seqlens`` = [0, T_0, L, L + T_1, 2L, ..., (S-1)L + T_(S-1), SL] and
        ``slots`` = [slot_0, -1, slot_1, -1, ...] (a lane with T = 0 and slot -1 is
        unused); returns each lane's last logits [S, vocab]. The padding leaves every
        state as its prompt left it (see ``supports_padded_prefill``), so one call
        shape serves every burst of up to S prompts of up to L tokens each: what a
        CUDA graph captured at (S, L) needs (``statex_serve.engine.runner``); the
        recurrences run over whole lanes, equal-length sequences, which the kernels
        take as a dense batch (no host sync to build variable-length indices)."""
        if padded:
            lanes, odd = divmod(cu_seqlens.numel() - 1, 2)
            if all_logits or odd or lanes < 1 or input_ids.numel() % lanes:
                raise ValueError("a padded prefill is S prompts in S lanes of equal length (cu_seqlens [0, T_0, "
                                 "L, L + T_1, ..., S x L]), last-token logits only")
            if not self.supports_padded_prefill:
                raise ValueError("this model cannot take a padded prefill: padding would move its state")
            lane_len = input_ids.numel() // lanes
            rows = torch.arange(input_ids.numel(), device=input_ids.device)
            prompt_lens = cu_seqlens[1::2] - cu_seqlens[0:-1:2]
            valid = (rows % lane_len) < prompt_lens[rows // lane_len]
        else:
            valid = None
        h = self.embeddings(input_ids)
        for i, block in enumerate(self.blocks):
            h = block.prefill(h, pools[i], slots, cu_seqlens, has_initial_state, valid)
        if padded:
            h = h[cu_seqlens[1::2].long() - 1]
        elif not all_logits:
            h = h[cu_seqlens[1:].long() - 1]
        return self._logits(h)

    @property
    def supports_padded_prefill(self) -> bool:
        """Whether padding can be made to leave the recurrent states unchanged
        (``prefill(..., padded=True)``); the families override where it depends on
        the config."""
        return True

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, slots: torch.Tensor, pools: StatePools) -> torch.Tensor:
        """Path (b). input_ids [B] (one token per sequence) -> logits [B, vocab]."""
        # Each block hands back its residual stream and its last sub-block's output
        # unadded: the next block adds them inside its pre-norm's kernel (one
        # launch fewer per layer; the step is launch-bound at one token).
        h, y = self.embeddings(input_ids), None
        for i, block in enumerate(self.blocks):
            h, y = block.decode(h, y, pools[i], slots)
        return self._logits(self.blocks[-1].add_residual(h, y))

    @torch.no_grad()
    def greedy_generate(self, prompt_ids: list[int], max_new_tokens: int, pools: StatePools | None = None,
                        slot: int = 0) -> list[int]:
        """Greedy tokens for one prompt through paths (c) then (b): the oracle the
        engines (native and vLLM) are compared with."""
        dev = self.device
        pools = pools or self.allocate_state_pools(1)
        ids = torch.tensor(prompt_ids, device=dev)
        cu = torch.tensor([0, len(prompt_ids)], device=dev, dtype=torch.int32)
        slots = torch.tensor([slot], device=dev, dtype=torch.int32)
        logits = self.prefill(ids, cu, slots, torch.tensor([False], device=dev), pools)
        out = []
        for _ in range(max_new_tokens):
            tok = int(logits[0].argmax())
            out.append(tok)
            if len(out) == max_new_tokens:
                break
            logits = self.decode(torch.tensor([tok], device=dev), slots, pools)
        return out
