"""What the vLLM classes of both families share: the one state page per
sequence (no padding), the backbone and LM-head base classes, weight loading,
and the tensor-parallel norm reductions. Why and how: docs/vllm.md ("No
padding: one state page per sequence", "The pieces", "Tensor parallelism";
``STATEX_VLLM_STATE_LAYOUT=per_layer`` gives vLLM's padded scheme, to measure it).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from model_registry.dtypes import parse_dtype
from model_registry.state import dtype_bytes
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import (get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import (HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching,
                                                   SupportsPP)
from vllm.model_executor.models.utils import (AutoWeightsLoader, PPMissingLayer, WeightsMapper, extract_layer_index,
                                              make_layers, maybe_prefix)
from vllm.sequence import IntermediateTensors
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

STATE_LAYOUT_ENV = "STATEX_VLLM_STATE_LAYOUT"
STATE_LAYOUTS = ("packed", "per_layer")


def state_layout() -> str:
    layout = os.environ.get(STATE_LAYOUT_ENV, "packed")
    if layout not in STATE_LAYOUTS:
        raise ValueError(f"{STATE_LAYOUT_ENV}={layout!r}: expected one of {STATE_LAYOUTS}")
    return layout


def state_dtypes(vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
    """(recurrent/ssm state dtype, conv state dtype). Recurrent state is fp32
    unless ``--mamba-ssm-cache-dtype`` says otherwise; the conv window is in the
    model dtype unless ``--mamba-cache-dtype`` says otherwise (as in our native engine)."""
    cache = vllm_config.cache_config
    ssm = parse_dtype(cache.mamba_ssm_cache_dtype) or torch.float32
    conv = parse_dtype(cache.mamba_cache_dtype) or vllm_config.model_config.dtype
    return ssm, conv


# --- the state page ----------------------------------------------------------------------

@dataclass(frozen=True)
class StateEntry:
    """One state tensor of one layer (per sequence, this rank) inside the page."""

    layer: int
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0            # bytes from the start of the page

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_bytes(self.dtype)


@dataclass(frozen=True)
class StatePage:
    entries: tuple[StateEntry, ...]
    nbytes: int

    @classmethod
    def pack(cls, tensors: list[tuple[int, str, tuple[int, ...], torch.dtype]]) -> "StatePage":
        """Widest dtype first: every entry then starts at a multiple of its element
        size; the page is rounded up to the widest element (at most 7 bytes)."""
        order = sorted(tensors, key=lambda t: -dtype_bytes(t[3]))   # stable: layer order kept
        entries, off = [], 0
        for layer, name, shape, dtype in order:
            e = StateEntry(layer, name, tuple(int(s) for s in shape), dtype, off)
            entries.append(e)
            off += e.nbytes
        align = max((dtype_bytes(t[3]) for t in tensors), default=1)
        return cls(tuple(entries), -(-off // align) * align)


class StateXStatePage(nn.Module, MambaBase):
    """The one state layer vLLM sees (per pipeline stage, or per layer with
    ``per_layer``): a byte page per sequence that holds the states of ``page.entries``."""

    def __init__(self, page: StatePage, prefix: str):
        super().__init__()
        self.page = page
        self.prefix = prefix
        self.kv_cache = (torch.tensor([]),)
        self._views: dict[tuple[int, str], torch.Tensor] = {}
        ctx = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"Duplicate layer name: {prefix}")
        ctx[prefix] = self

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        # LINEAR metadata (state indices, query_start_loc, seq_lens, decode/prefill
        # split) is all our kernels need, for both families.
        return MambaAttentionBackendEnum.LINEAR

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return ((self.page.nbytes,),)

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return (torch.uint8,)

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        super().bind_kv_cache(kv_cache)            # self.kv_cache = ([num_blocks, page] uint8,)
        pages = self.kv_cache[0]
        self._views = {(e.layer, e.name): pages[:, e.offset:e.offset + e.nbytes].view(e.dtype).view(-1, *e.shape)
                       for e in self.page.entries}

    def pool(self, layer: int, name: str) -> torch.Tensor:
        """``[num_blocks, *shape]`` view of one layer's state (block stride = page size)."""
        return self._views[(layer, name)]

    def zero_fresh_decodes(self, split: "StepSplit") -> None:
        """A one-token prompt is scheduled as a decode, and decode kernels read the
        state: give such sequences a zero state (prefills with no context don't read it)."""
        if split.fresh_decode_slots is not None and split.fresh_decode_slots.numel():
            self.kv_cache[0][split.fresh_decode_slots.long()] = 0


def mamba_state_copy_funcs():
    """Prefix caching ('align' mode) copies whole pages between blocks."""
    return (get_temporal_copy_spec,)


# --- one step's batch, as our kernels want it ----------------------------------------------

@dataclass
class StepSplit:
    num_actual_tokens: int
    num_decodes: int
    num_prefills: int
    slots_d: torch.Tensor            # [nd] int32
    slots_p: torch.Tensor            # [np]
    cu_seqlens_p: torch.Tensor       # [np+1] int32, from 0
    has_initial_state_p: torch.Tensor  # [np] bool
    fresh_decode_slots: torch.Tensor | None


def step_split(md) -> StepSplit:
    """From vLLM's LinearAttentionMetadata (decodes first, one token each)."""
    nd, npf = md.num_decodes, md.num_prefills
    if md.num_decode_tokens != nd:
        raise NotImplementedError("speculative decoding is not supported by the StateX vLLM models")
    slots = md.state_indices_tensor
    qsl = md.query_start_loc
    cu = (qsl[nd:nd + npf + 1] - qsl[nd]).to(torch.int32)
    qlen = cu[1:] - cu[:-1]
    has_init = (md.seq_lens[nd:nd + npf] - qlen) > 0
    fresh = None
    if nd:
        sd = slots[:nd]
        fresh = sd[(md.seq_lens[:nd] == 1) & (sd >= 0)]
    return StepSplit(md.num_decode_tokens + md.num_prefill_tokens, nd, npf, slots[:nd], slots[nd:nd + npf],
                     cu, has_init, fresh)


# --- the custom op around each mixer ------------------------------------------------------

class StateMixer(nn.Module):
    """Base of our token mixers: ``forward`` runs ``forward_impl`` through one
    custom op (opaque to torch.compile, an eager break in CUDA-graph capture),
    which reads this step's metadata and updates the state page in place."""

    def __init__(self, layer_idx: int, prefix: str):
        super().__init__()
        self.layer_idx = layer_idx
        self.prefix = prefix
        self.first_in_page = False
        ctx = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"Duplicate layer name: {prefix}")
        ctx[prefix] = self

    def attach(self, page: StateXStatePage, first_in_page: bool) -> None:
        self.__dict__["state_page"] = page          # not a submodule: the model owns it
        self.first_in_page = first_in_page

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = torch.empty_like(hidden_states)
        torch.ops.vllm.statex_mixer(hidden_states, output, self.prefix)
        return output

    def step(self) -> StepSplit | None:
        """This step's split, or None in profiling / dummy runs (no state touched)."""
        md = get_forward_context().attn_metadata
        if md is None:
            return None
        md = md.get(self.state_page.prefix) if isinstance(md, dict) else None
        if md is None:
            return None
        split = step_split(md)
        if self.first_in_page:
            self.state_page.zero_fresh_decodes(split)
        return split

    def forward_impl(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        raise NotImplementedError


@eager_break_during_capture
def statex_mixer(hidden_states: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    layer = get_forward_context().no_compile_layers[layer_name]
    layer.forward_impl(hidden_states, output)


def _statex_mixer_fake(hidden_states: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op(op_name="statex_mixer", op_func=statex_mixer, mutates_args=["output"],
                          fake_impl=_statex_mixer_fake)


# --- the model-level pieces ----------------------------------------------------------------

def build_state_pages(model: nn.Module, mixers: dict[int, StateMixer],
                      tensors: dict[int, list[tuple[str, tuple[int, ...], torch.dtype]]],
                      prefix: str) -> nn.ModuleList:
    """Create the state layer(s) for this stage's layers and attach the mixers."""
    layers = sorted(mixers)
    if not layers:
        return nn.ModuleList()
    if state_layout() == "packed":
        groups = [layers]
    else:
        groups = [[i] for i in layers]
    pages = nn.ModuleList()
    for group in groups:
        page = StatePage.pack([(i, name, shape, dt) for i in group for name, shape, dt in tensors[i]])
        holder = StateXStatePage(page, f"{prefix}.{group[0]}.statex_state")
        for j, i in enumerate(group):
            mixers[i].attach(holder, first_in_page=(j == 0))
        pages.append(holder)
    return pages


def config_state_shapes(tensors: dict[int, list[tuple[str, tuple[int, ...], torch.dtype]]]
                        ) -> tuple[tuple[tuple[int, ...], ...], tuple[torch.dtype, ...]]:
    """What ``get_mamba_state_shape/dtype_from_config`` report: the page of the
    whole model (packed), or the largest layer's page (per_layer)."""
    if state_layout() == "packed":
        page = StatePage.pack([(i, n, s, d) for i, ts in tensors.items() for n, s, d in ts])
    else:
        page = max((StatePage.pack([(i, n, s, d) for n, s, d in ts]) for i, ts in tensors.items()),
                   key=lambda p: p.nbytes)
    return ((page.nbytes,),), (torch.uint8,)


def reduce_norm_sq(sq: torch.Tensor, group: int, num_groups: int) -> torch.Tensor:
    """Sum ``sq`` (partial sums of squares of one norm group) over the TP ranks that
    hold a part of the same group. Ranks of other groups add zeros in other columns,
    so one all-reduce of a ``[..., num_groups]`` tensor serves every sub-group."""
    if num_groups == 1:
        return tensor_model_parallel_all_reduce(sq)
    buf = sq.new_zeros(*sq.shape, num_groups)
    buf[..., group] = sq
    return tensor_model_parallel_all_reduce(buf)[..., group]


def set_loader(param: torch.Tensor, loader) -> None:
    param.weight_loader = loader


def rows_loader(slices: list[tuple[int, int]], dim: int = 0, transform=None):
    """Weight loader taking rows ``[start, start+len)`` of each slice of the full
    checkpoint tensor (along ``dim``) and concatenating them."""

    def load(param: torch.Tensor, loaded: torch.Tensor) -> None:
        w = torch.cat([loaded.narrow(dim, s, n) for s, n in slices], dim=dim)
        if transform is not None:
            w = transform(w)
        if tuple(w.shape) != tuple(param.data.shape):
            raise ValueError(f"weight shape {tuple(w.shape)} does not fit parameter {tuple(param.data.shape)}")
        param.data.copy_(w)

    return load



# --- the backbone and causal-LM shells both families share -------------------------------

class StateXBackbone(nn.Module):
    """Embeddings, this pipeline stage's blocks with their state page(s), and the
    forward over them. A family sets ``embeddings`` and its last stage's norm, calls
    ``build_layers`` and says in ``final_norm`` how the hidden states leave."""

    def build_layers(self, vllm_config: VllmConfig, prefix: str, num_layers: int, make_block, mixer: str,
                     state_tensors) -> None:
        """``make_block(layer, prefix)``; ``mixer``: the block's StateMixer attribute;
        ``state_tensors``: the family's ``StateXForCausalLM.state_tensors``."""
        self.start_layer, self.end_layer, self.layers = make_layers(
            num_layers, lambda prefix: make_block(extract_layer_index(prefix), prefix), prefix=f"{prefix}.layers")
        local = range(self.start_layer, self.end_layer)
        tensors = state_tensors(vllm_config, local, get_tensor_model_parallel_rank(),
                                get_tensor_model_parallel_world_size())
        self.state_pages = build_state_pages(self, {i: getattr(self.layers[i], mixer) for i in local}, tensors,
                                             f"{prefix}.layers")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if get_pp_group().is_first_rank:
            h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        else:
            h = intermediate_tensors["hidden_states"]
        for i in range(self.start_layer, self.end_layer):
            h = self.layers[i](h)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": h})
        return self.final_norm(h)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class StateXForCausalLM(nn.Module, HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching, SupportsPP):
    """Backbone + LM head, the state description vLLM asks for before building the
    model, and weights through vLLM's ``AutoWeightsLoader``. A family sets:

    - ``backbone_cls`` (``__init__(*, vllm_config, prefix)``, ``.embeddings``,
      ``.make_empty_intermediate_tensors``, ``.embed_input_ids``, ``forward``) and
      ``backbone_name``, its attribute and checkpoint prefix (fla ``model``, HF ``backbone``);
    - ``state_tensors(vllm_config, layers, rank, tp)``: what each layer keeps per
      sequence, the same function the layers allocate with;
    - ``hf_to_vllm_mapper``: checkpoint names -> parameter names, where they differ.
    """

    backbone_cls: type[nn.Module]
    backbone_name: str
    hf_to_vllm_mapper = WeightsMapper()

    @staticmethod
    def state_tensors(vllm_config: VllmConfig, layers: Iterable[int], rank: int, tp: int
                      ) -> dict[int, list[tuple[str, tuple[int, ...], torch.dtype]]]:
        raise NotImplementedError

    # -- state description (must agree with what the layers allocate) --
    @classmethod
    def _model_state_tensors(cls, vllm_config: VllmConfig):
        layers = range(vllm_config.model_config.hf_config.num_hidden_layers)
        return cls.state_tensors(vllm_config, layers, 0, vllm_config.parallel_config.tensor_parallel_size)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return config_state_shapes(cls._model_state_tensors(vllm_config))[0]

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return config_state_shapes(cls._model_state_tensors(vllm_config))[1]

    @classmethod
    def get_mamba_state_copy_func(cls):
        return mamba_state_copy_funcs()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        backbone = self.backbone_cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, self.backbone_name))
        setattr(self, self.backbone_name, backbone)
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(backbone.embeddings)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = backbone.make_empty_intermediate_tensors

    def _backbone(self) -> nn.Module:
        return getattr(self, self.backbone_name)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._backbone().embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        return self._backbone()(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # a tied lm_head.weight is skipped (it aliases the embeddings), layers of
        # other pipeline stages (PPMissingLayer) are passed over
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
