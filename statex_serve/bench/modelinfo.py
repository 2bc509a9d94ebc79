"""Facts about a model that set its memory and its decode floor: parameters,
weight bytes, per-sequence state (recurrent models) or KV cache per token
(Transformers), and a Llama-style Transformer of the same size to compare with.

The decode floor (gpt-fast's yardstick): one decode step of a batch of B reads
every weight once and each sequence's state once and writes it back, so

    TPOT >= (weight bytes + B x 2 x state bytes) / memory bandwidth

(for a Transformer the state is the KV cache: B x KV bytes of the context read,
one token's written). Activations are small and left out.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# names -> bytes without importing torch (model_registry.dtypes does): the bench's
# argument checks answer before the heavy imports
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}
H200_BANDWIDTH = 4.25e12   # bytes/s: device-to-device copy measured on the H200 (docs/perf.md)

# name -> (family, expanded): GLA-1.3B and Mamba2-1.3B and their StateX versions
# as the paper sets them up (model_registry.configs.STATEX_1P3B_LAYERS).
PRESETS = {
    "gla-1.3b": ("gla", False),
    "gla-1.3b-statex": ("gla", True),
    "mamba2-1.3b": ("mamba2", False),
    "mamba2-1.3b-statex": ("mamba2", True),
}


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[str(name).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (float32, bfloat16, float16)") from None


def preset_config(name: str, **overrides):
    """The preset's config; ``overrides`` (e.g. vocab_size, token ids) pass through."""
    from model_registry.configs import statex_1p3b_config

    family, expanded = PRESETS[name]
    return statex_1p3b_config(family, expanded, **overrides)


_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _safetensors_params(model_dir: Path) -> tuple[int | None, str | None]:
    """Parameter count and the dtype most of them are stored in, from the
    safetensors headers (no tensor is read)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None, None
    by_dtype: dict[str, int] = {}
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                by_dtype[v["dtype"]] = by_dtype.get(v["dtype"], 0) + math.prod(v["shape"])
    main = max(by_dtype, key=by_dtype.get)
    return sum(by_dtype.values()), _ST_DTYPES.get(main)


def _meta_numel(config) -> int:
    import torch   # here and below, not at the top: the bench checks its arguments without torch
    from transformers import AutoModelForCausalLM

    import model_registry  # noqa: F401  (registers our model types)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@dataclass
class ModelFacts:
    name: str
    source: str                     # preset name or checkpoint directory
    model_type: str                 # statex_gla, statex_mamba2, llama, ...
    params: int
    weights_dtype: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    state_dtype: str | None = None
    state_bytes_per_sequence: int = 0      # constant part (recurrent state)
    kv_bytes_per_token: int = 0            # grows with context (Transformers)
    expanded_layers: list[int] | None = None

    @property
    def weights_bytes(self) -> int:
        return self.params * dtype_bytes(self.weights_dtype)

    @property
    def recurrent(self) -> bool:
        return self.kv_bytes_per_token == 0

    def bytes_per_sequence(self, context: int) -> int:
        return self.state_bytes_per_sequence + self.kv_bytes_per_token * context

    def max_sequences(self, budget_bytes: int, context: int) -> int:
        return budget_bytes // self.bytes_per_sequence(context)

    def decode_floor_s(self, batch: int, context: int, bandwidth: float) -> float:
        per_seq = 2 * self.state_bytes_per_sequence + self.kv_bytes_per_token * (context + 1)
        return (self.weights_bytes + batch * per_seq) / bandwidth

    def to_dict(self) -> dict:
        return {**asdict(self), "weights_bytes": self.weights_bytes}


def statex_facts(config, name: str, source: str, params: int | None = None, weights_dtype: str = "bfloat16",
                 state_dtype: str = "float32") -> ModelFacts:
    import torch

    spec = config.state_spec(getattr(torch, state_dtype), conv_dtype=getattr(torch, weights_dtype))
    return ModelFacts(
        name=name, source=source, model_type=config.model_type,
        params=params if params is not None else _meta_numel(config), weights_dtype=weights_dtype,
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, vocab_size=config.vocab_size,
        tie_word_embeddings=bool(config.tie_word_embeddings), state_dtype=state_dtype,
        state_bytes_per_sequence=spec.bytes_per_sequence, expanded_layers=list(config.expanded_layers))


def transformer_facts(config, name: str, source: str, params: int | None = None, weights_dtype: str = "bfloat16",
                      kv_dtype: str = "bfloat16") -> ModelFacts:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelFacts(
        name=name, source=source, model_type=config.model_type,
        params=params if params is not None else _meta_numel(config), weights_dtype=weights_dtype,
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)), state_dtype=kv_dtype,
        kv_bytes_per_token=kv_bytes_per_token(config.num_hidden_layers, kv_heads, head_dim, kv_dtype))


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: str) -> int:
    """K and V, every layer: 2 x layers x kv_heads x head_dim x bytes."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes(dtype)


def load_facts(source: str, weights_dtype: str | None = None, state_dtype: str = "float32",
               kv_dtype: str = "bfloat16") -> ModelFacts:
    """A preset name or a checkpoint directory (ours, or a Transformer's)."""
    if source in PRESETS:
        return statex_facts(preset_config(source), source, f"preset:{source}", None, weights_dtype or "bfloat16",
                            state_dtype)
    path = Path(source)
    if not (path / "config.json").is_file():
        raise ValueError(f"{source}: neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
    from transformers import AutoConfig

    import model_registry  # noqa: F401

    config = AutoConfig.from_pretrained(str(path))
    params, stored = _safetensors_params(path)
    wdt = weights_dtype or stored or str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    if config.model_type.startswith("statex_"):
        return statex_facts(config, path.name, str(path), params, wdt, state_dtype)
    if hasattr(config, "num_attention_heads"):
        return transformer_facts(config, path.name, str(path), params, wdt, kv_dtype)
    raise ValueError(f"{source}: model type {config.model_type!r} is neither ours nor an attention model")


def matched_llama_config(facts: ModelFacts, kv_heads: int | None = None):
    """A Llama with the same width, vocabulary and embedding tying, and the number
    of layers that brings its parameter count closest to ``facts.params``.
    Head dim 128 from width 2048 (64 from 512, else width/4); MLP 8/3 x width
    rounded up to a multiple of 64 (of 8 for tiny widths); MHA unless told."""
    from transformers import LlamaConfig

    h = facts.hidden_size
    head_dim = 128 if h >= 2048 else 64 if h >= 512 else max(8, h // 4)
    heads = max(1, h // head_dim)
    kv = kv_heads or heads
    if heads % kv:
        raise ValueError(f"--kv-heads {kv} must divide the {heads} attention heads")
    mult = 64 if h >= 512 else 8
    inter = -(-int(8 * h / 3) // mult) * mult
    V, tied = facts.vocab_size, facts.tie_word_embeddings
    fixed = V * h * (1 if tied else 2) + h
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter + 2 * h
    layers = max(1, round((facts.params - fixed) / per_layer))
    return LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                       tie_word_embeddings=tied, max_position_embeddings=1 << 20)


def matched_transformer(facts: ModelFacts, kv_heads: int | None = None, kv_dtype: str = "bfloat16") -> ModelFacts:
    config = matched_llama_config(facts, kv_heads)
    return transformer_facts(config, f"llama-like ({facts.name})", f"matched to {facts.name}", None,
                             facts.weights_dtype, kv_dtype)


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Every K/V tensor a transformers cache holds (DynamicCache of transformers 4.5x-5.x)."""
    import torch

    out = []
    for layer in getattr(cache, "layers", []):
        out += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if torch.is_tensor(t)]
    if not out:   # older layout
        out = [t for t in list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", []))
               if torch.is_tensor(t)]
    return out


def measure_llama_kv(contexts: list[int], batch: int = 2, dtype: str = "float32", seed: int = 0) -> list[dict]:
    """Run a tiny ``LlamaForCausalLM`` (GQA: 4 query heads, 2 KV heads) with
    ``use_cache=True`` on CPU and weigh the tensors its cache actually holds,
    next to the formula this module uses for big models."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=max(contexts) + 1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    per_token = kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, dtype)
    rows = []
    for ctx in contexts:
        ids = torch.randint(0, config.vocab_size, (batch, ctx))
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
        measured = sum(t.numel() * t.element_size() for t in _cache_tensors(cache))
        rows.append({"context": ctx, "batch": batch, "measured_bytes": measured,
                     "formula_bytes": batch * per_token * ctx, "measured_bytes_per_sequence": measured // batch,
                     "match": measured == batch * per_token * ctx})
    return rows


def parse_bandwidth(text: str) -> float:
    """``4.25TB/s``, ``3.35e12``, ``900 GB/s`` -> bytes per second (decimal units)."""
    t = text.strip().lower().replace(" ", "").removesuffix("/s").removesuffix("ps")
    units = {"tb": 1e12, "gb": 1e9, "mb": 1e6, "b": 1.0, "": 1.0}
    for u in ("tb", "gb", "mb", "b", ""):
        if t.endswith(u) and t[:len(t) - len(u)]:
            try:
                value = float(t[:len(t) - len(u)]) * units[u]
            except ValueError:
                continue
            if value > 0:
                return value
    raise ValueError(f"cannot read {text!r} as a bandwidth (examples: 4.25TB/s, 900GB/s, 3.35e12)")
