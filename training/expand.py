"""StateX: expand the recurrent state of chosen layers of a pre-trained model.

GLA merges a layer's H heads into H' (``expand_gla_heads``), or, with the
function-preserving ``preserve``, keeps the heads and widens each one's keys
K -> K' (``widen_gla_keys``); Mamba2 grows d_state N -> N' (``expand_mamba2_state``).
What each ``--init`` keeps and what it redraws (following the StateX reference code, thunlp/StateX), and the
parameter and state bookkeeping: docs/training.md (`expand`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from model_registry.checkpoint import check_and_load
from model_registry.mamba2 import MAMBA_A_INIT_RANGE, mamba_dt_bias_init
from training.errors import UsageError

GLA_INITS = ("reinit", "inherit", "preserve")   # preserve: widen keys (widen_gla_keys), not a merge
MAMBA2_INITS = ("reinit", "merge_copy", "merge_zero", "preserve")
# What an expanded Mamba2 layer's dt_bias / A_log become. ``official``: the
# reference code's dt_bias = 1 (its placeholder is never re-initialised, so the
# layer starts with about one token of memory) and A_log = log(1..H);
# ``inherit``: the base layer's values; ``init``: mamba_ssm's from-scratch draw.
MAMBA2_DT_INITS = ("official", "inherit", "init")
GLA_XAVIER_GAIN = 2 ** -2.5          # fla GatedLinearAttention._initialize_weights


@dataclass
class Expansion:
    """What one call to ``expand_*`` did: the new model and its bookkeeping."""

    model: torch.nn.Module
    family: str
    layers: list[int]
    init: str
    seed: int
    per_layer: dict[int, dict] = field(default_factory=dict)   # layer -> {"before": .., "after": ..}
    dt_init: str | None = None                                  # Mamba2: what dt_bias / A_log became

    def record(self, base_model: torch.nn.Module) -> dict:
        """statex.json's ``expansion`` entry: what, how, parameters and state before/after."""
        p0, p1 = count_parameters(base_model), count_parameters(self.model)
        s0, s1 = base_model.state_spec(), self.model.state_spec()
        if self.family == "mamba2":
            what, method = "state_size", "grow d_state"
        else:   # GLA's preserve widens keys; its other inits merge heads
            what, method = ("head_k_dim", "widen keys") if self.init == "preserve" else ("num_heads", "merge heads")
        return {
            "family": self.family,
            "method": method,
            "layers": self.layers,
            "init": self.init,
            **({"dt_init": self.dt_init} if self.dt_init is not None else {}),
            "seed": self.seed,
            what: {str(layer): v for layer, v in self.per_layer.items()},
            "parameters": {"before": p0, "after": p1, "added": p1 - p0},
            "state": {
                "bytes_per_sequence_before": s0.bytes_per_sequence,
                "bytes_per_sequence_after": s1.bytes_per_sequence,
                "elements_per_sequence_before": s0.elements_per_sequence,
                "elements_per_sequence_after": s1.elements_per_sequence,
                "ratio": s1.bytes_per_sequence / s0.bytes_per_sequence,
                "per_layer_bytes_before": [layer.nbytes for layer in s0.layers],
                "per_layer_bytes_after": [layer.nbytes for layer in s1.layers],
            },
        }


def count_parameters(model: torch.nn.Module) -> int:
    # model.parameters() visits a tied embedding once
    return sum(p.numel() for p in model.parameters())


def choose_layers(num_layers: int, every: int | None = None, layers: list[int] | str | None = None) -> list[int]:
    """Layers 0, P, 2P, ... (``every``) or an explicit list; exactly one of the two."""
    if (every is None) == (layers is None):
        raise UsageError("choose the layers with exactly one of --every P or --layers I,J,...")
    if every is not None:
        if every < 1:
            raise UsageError(f"--every must be at least 1, got {every}")
        return list(range(0, num_layers, every))
    if isinstance(layers, str):
        try:
            layers = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--layers must be comma-separated integers, got {layers!r}") from None
    if not layers:
        raise UsageError("--layers is empty")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise UsageError(f"layer index {bad[0]} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    if len(set(layers)) != len(layers):
        raise UsageError(f"--layers repeats a layer: {layers}")
    return sorted(layers)


# --- initialisers (explicit generator so an expansion is reproducible from its seed) ---

def _xavier_uniform(shape, gain: float, gen: torch.Generator) -> torch.Tensor:
    fan_out, fan_in = shape
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def _torch_default_uniform(shape, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """What nn.Linear / nn.Conv1d's reset_parameters draw: kaiming_uniform(a=sqrt(5))
    for weights and U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for biases are the same bound."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def _like(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return new.to(dtype=old.dtype)


def _grow_preserving(old: torch.Tensor, G: int, N2: int, new_rows: torch.Tensor) -> torch.Tensor:
    """Rows [G*N, ...] -> [G*N2, ...]: per block (a Mamba2 B/C group, a GLA head) its N old
    rows, then N2 - N of ``new_rows``."""
    g = old.reshape(G, -1, *old.shape[1:])
    extra = new_rows.reshape(G, N2 - g.shape[1], *old.shape[1:])
    return torch.cat([g, _like(extra, old)], dim=1).reshape(-1, *old.shape[1:])


def _build(model, new_config, sd: dict[str, torch.Tensor]):
    """A model of ``type(model)`` for ``new_config`` holding exactly ``sd``."""
    with torch.device("meta"):
        new = type(model)(new_config)
    new = new.to_empty(device="cpu")
    tied = getattr(new_config, "tie_word_embeddings", False)
    if tied:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    # strict: the expanded state dict must fill the new config's model exactly, so every
    # shape is checked here, once; everything outside the expanded mixers was copied
    # bit for bit into ``sd``
    check_and_load(new, sd, "expanded model", allow_missing=("lm_head.weight",) if tied else ())
    return new.to(dtype=next(model.parameters()).dtype).eval()


def _cpu_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# --- GLA ------------------------------------------------------------------------------

def expand_gla_heads(model, layers: list[int], num_heads: int = 1, init: str = "reinit", seed: int = 0
                     ) -> Expansion:
    """Merge the heads of ``layers`` into ``num_heads`` heads (StateX for GLA)."""
    cfg = model.config
    if init not in GLA_INITS or init == "preserve":
        raise UsageError(f"unknown GLA merge init {init!r} (choose from reinit, inherit; "
                         "preserve widens keys: widen_gla_keys)")
    layers = choose_layers(cfg.num_hidden_layers, layers=list(layers))
    for i in layers:
        cur = cfg.layer_num_heads[i]
        if num_heads < 1 or cur % num_heads or num_heads >= cur:
            raise UsageError(f"layer {i}: --heads {num_heads} must be fewer than and divide its {cur} heads "
                             f"(merging H heads into H' multiplies the state by H/H')")
        if cfg.layer_key_dim[i] % num_heads or cfg.value_dim % num_heads:
            raise UsageError(f"--heads {num_heads} does not divide layer {i}'s key dim {cfg.layer_key_dim[i]} / "
                             f"value_dim {cfg.value_dim}")

    gen = torch.Generator().manual_seed(seed)
    sd = _cpu_state_dict(model)
    per_layer = {}
    for i in layers:
        p = f"model.layers.{i}."
        cur = cfg.layer_num_heads[i]
        per_layer[i] = {"before": cur, "after": num_heads}
        norm_key = p + "attn.g_norm_swish_gate.weight"
        old_norm = sd[norm_key]
        # the short convs (use_short_conv) are kept in both inits: depthwise over the flat q | k | v
        # channels, before the head split, so merging heads moves no channel
        if init == "reinit":
            for name in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "gk_proj.0", "gk_proj.1"):
                w = sd[p + f"attn.{name}.weight"]
                sd[p + f"attn.{name}.weight"] = _like(_xavier_uniform(tuple(w.shape), GLA_XAVIER_GAIN, gen), w)
            sd[p + "attn.gk_proj.1.bias"] = torch.zeros_like(sd[p + "attn.gk_proj.1.bias"])
            sd[norm_key] = torch.ones(cfg.value_dim // num_heads, dtype=old_norm.dtype)
        else:  # inherit: same projections, the per-head norm weight tiled over the merged heads
            sd[norm_key] = old_norm.repeat(cur // num_heads)
        sd[p + "attn_norm.weight"] = torch.ones_like(sd[p + "attn_norm.weight"])

    new_config = copy.deepcopy(cfg)
    new_config.layer_num_heads = [num_heads if i in layers else h for i, h in enumerate(cfg.layer_num_heads)]
    if cfg.layer_attn_scale is not None:   # a merged head scores at its own 1/sqrt(K), whatever it was before
        new_config.layer_attn_scale = [None if i in layers else sc for i, sc in enumerate(cfg.layer_attn_scale)]
    new_config.validate_statex()
    return Expansion(_build(model, new_config, sd), "gla", layers, init, seed, per_layer)


def widen_gla_keys(model, layers: list[int], head_k_dim: int, seed: int = 0) -> Expansion:
    """Widen each head's keys in ``layers`` to ``head_k_dim`` (the heads stay): GLA's
    analogue of Mamba2's ``preserve``. Per head the old q / k rows, decay-gate rows and
    conv taps are kept. The new k rows and all new conv taps are drawn; the new q rows are
    zero, so the new q is silu(conv(0)) = 0, and the layer keeps the base's score scale
    1/sqrt(K) (``layer_attn_scale``), so it computes the base's function exactly until
    training moves them. (With 1/sqrt(K') the per-head RMS norm would undo the smaller
    scale only up to its eps, and trained GLA outputs are small enough for eps to matter.)
    The new dimensions' decay-gate rows repeat the head's old ones (the decays the base
    learned; the random k rows break the symmetry)."""
    cfg = model.config
    layers = choose_layers(cfg.num_hidden_layers, layers=list(layers))
    for i in layers:
        H, K, _ = cfg.head_dims(i)
        if head_k_dim <= K or head_k_dim % K:
            raise UsageError(f"layer {i}: --head-k-dim {head_k_dim} must be a larger multiple of its key dim "
                             f"per head {K} (e.g. {4 * K})")

    D, W = cfg.hidden_size, cfg.conv_size
    gen = torch.Generator().manual_seed(seed)
    sd = _cpu_state_dict(model)
    per_layer = {}
    for i in layers:
        p = f"model.layers.{i}.attn."
        H, K, _ = cfg.head_dims(i)
        new = H * (head_k_dim - K)            # new rows per tensor, over all heads
        per_layer[i] = {"before": K, "after": head_k_dim}
        q, k = sd[p + "q_proj.weight"], sd[p + "k_proj.weight"]
        sd[p + "q_proj.weight"] = _grow_preserving(q, H, head_k_dim, torch.zeros(new, D))
        k_init = _xavier_uniform((H * head_k_dim, D), GLA_XAVIER_GAIN, gen)[:new]   # fla's init at the new width
        sd[p + "k_proj.weight"] = _grow_preserving(k, H, head_k_dim, k_init)
        reps = head_k_dim // K - 1
        for name in ("gk_proj.1.weight", "gk_proj.1.bias"):
            old = sd[p + name]
            sd[p + name] = _grow_preserving(old, H, head_k_dim, old.reshape(H, K, *old.shape[1:]).repeat(
                1, reps, *([1] * (old.dim() - 1))).reshape(new, *old.shape[1:]))
        for name in ("q_conv1d.weight", "k_conv1d.weight"):
            if p + name in sd:   # use_short_conv: depthwise [C, 1, W]; the new q taps must not be 0,
                old = sd[p + name]   # or the zero q rows would get no gradient through them
                sd[p + name] = _grow_preserving(old, H, head_k_dim,
                                                _torch_default_uniform((new, *old.shape[1:]), W, gen))

    new_config = copy.deepcopy(cfg)
    new_config.layer_key_dim = [H * head_k_dim if i in layers else kd for i, (kd, H) in
                                enumerate(zip(cfg.layer_key_dim, cfg.layer_num_heads))]
    old_scales = cfg.layer_attn_scale or [None] * cfg.num_hidden_layers
    new_config.layer_attn_scale = [cfg.attn_scale(i) if i in layers else old_scales[i]
                                   for i in range(cfg.num_hidden_layers)]
    new_config.validate_statex()
    return Expansion(_build(model, new_config, sd), "gla", layers, "preserve", seed, per_layer)


# --- Mamba2 ---------------------------------------------------------------------------

def _grow_groups(old: torch.Tensor, groups: int, factor: int, mode: str) -> torch.Tensor:
    """Rows [G*N, ...] -> [G*N*factor, ...], per group: tiled (merge_copy) or
    followed by zeros (merge_zero). For one group this is exactly the reference
    code's ``repeat`` / ``cat([old, zeros])``; with several groups each group
    keeps its own rows (the reference code would interleave groups)."""
    g = old.reshape(groups, -1, *old.shape[1:])
    if mode == "merge_copy":
        parts = [g] * factor
    else:
        parts = [g] + [torch.zeros_like(g)] * (factor - 1)
    return torch.cat(parts, dim=1).reshape(-1, *old.shape[1:])


def _grow_bc(old: torch.Tensor, offset: int, G: int, N: int, N2: int, fan_in: int, init: str,
             gen: torch.Generator, c_input: bool = True) -> torch.Tensor:
    """Replace the B and C blocks (G*N rows each, starting at ``offset``) by G*N2 rows each.
    ``c_input``: these rows produce C (in_proj rows, the conv's bias); False for the conv's
    weight taps, which only pass C on (``preserve`` keeps them random so C's in_proj rows
    get a gradient)."""
    head, B, C, tail = torch.split(old, [offset, G * N, G * N, old.shape[0] - offset - 2 * G * N])
    if init == "reinit":
        shape = (G * N2, *old.shape[1:])
        B2 = _like(_torch_default_uniform(shape, fan_in, gen), old)
        C2 = _like(_torch_default_uniform(shape, fan_in, gen), old)
    elif init == "preserve":
        # the old rows kept; the new state dimensions written by random B rows and read by C
        # rows that are zero after the conv + SiLU (zero in_proj rows and conv bias: silu(0) = 0),
        # so the layer computes what it did until training moves C. The random B rows break the
        # symmetry that keeps merge_copy's tiles identical and merge_zero's zeros at zero
        shape = (G * (N2 - N), *old.shape[1:])
        B2 = _grow_preserving(B, G, N2, _torch_default_uniform(shape, fan_in, gen))
        new_c = torch.zeros(shape) if c_input else _torch_default_uniform(shape, fan_in, gen)
        C2 = _grow_preserving(C, G, N2, new_c)
    else:
        B2, C2 = _grow_groups(B, G, N2 // N, init), _grow_groups(C, G, N2 // N, init)
    return torch.cat([head, B2, C2, tail]).contiguous()


def expand_mamba2_state(model, layers: list[int], state_size: int, init: str = "reinit", seed: int = 0,
                        dt_init: str = "official") -> Expansion:
    """Grow d_state of ``layers`` to ``state_size`` (StateX for Mamba2)."""
    cfg = model.config
    if init not in MAMBA2_INITS:
        raise UsageError(f"unknown Mamba2 init {init!r} (choose from {', '.join(MAMBA2_INITS)})")
    if dt_init not in MAMBA2_DT_INITS:
        raise UsageError(f"unknown Mamba2 dt init {dt_init!r} (choose from {', '.join(MAMBA2_DT_INITS)})")
    layers = choose_layers(cfg.num_hidden_layers, layers=list(layers))
    for i in layers:
        n = cfg.layer_state_size[i]
        if state_size <= n or state_size % n:
            raise UsageError(f"layer {i}: --state-size {state_size} must be a larger multiple of its "
                             f"d_state {n} (e.g. {4 * n})")

    D, I, G, H, W = cfg.hidden_size, cfg.intermediate_size, cfg.n_groups, cfg.num_heads, cfg.conv_kernel
    gen = torch.Generator().manual_seed(seed)
    sd = _cpu_state_dict(model)
    per_layer = {}
    for i in layers:
        p = f"backbone.layers.{i}.mixer."
        N, N2 = cfg.layer_state_size[i], state_size
        per_layer[i] = {"before": N, "after": N2}

        # in_proj rows: z (I) | x (I) | B (G*N) | C (G*N) | dt (H); fan_in = d_model
        for name, offset, fan_in in (("in_proj.weight", 2 * I, D), ("in_proj.bias", 2 * I, D),
                                     # conv channels: x (I) | B | C; depthwise, so fan_in = kernel width
                                     ("conv1d.weight", I, W), ("conv1d.bias", I, W)):
            if p + name in sd:
                sd[p + name] = _grow_bc(sd[p + name], offset, G, N, N2, fan_in, init, gen,
                                        c_input=name != "conv1d.weight")
        if dt_init == "official":
            sd[p + "dt_bias"] = torch.ones_like(sd[p + "dt_bias"])
            sd[p + "A_log"] = torch.log(torch.arange(1, H + 1, dtype=torch.float32)).to(sd[p + "A_log"].dtype)
        elif dt_init == "init":
            dt_bias = mamba_dt_bias_init(H, cfg.time_step_min, cfg.time_step_max, cfg.time_step_floor, gen)
            A = torch.empty(H).uniform_(*MAMBA_A_INIT_RANGE, generator=gen)
            sd[p + "dt_bias"] = _like(dt_bias, sd[p + "dt_bias"])
            sd[p + "A_log"] = _like(torch.log(A), sd[p + "A_log"])
        if init != "preserve":   # the gated norm is over d_inner, not d_state: preserve keeps it
            sd[p + "norm.weight"] = torch.ones_like(sd[p + "norm.weight"])

    new_config = copy.deepcopy(cfg)
    new_config.layer_state_size = [state_size if i in layers else n for i, n in enumerate(cfg.layer_state_size)]
    new_config.validate_statex()
    return Expansion(_build(model, new_config, sd), "mamba2", layers, init, seed, per_layer, dt_init)


def mamba2_added_parameters(config, layer: int, new_state_size: int) -> int:
    """The formula in docs/training.md, 2*G*dN*(d_model + d_conv + 1), generalised to
    the bias flags: in_proj rows (+bias), conv weight taps, conv bias."""
    dN = new_state_size - config.layer_state_size[layer]
    return 2 * config.n_groups * dN * (config.hidden_size + int(config.use_bias) + config.conv_kernel
                                       + int(config.use_conv_bias))


def gla_added_parameters(config, layer: int, new_num_heads: int) -> int:
    """Only the output-norm weight grows: V/H' - V/H entries."""
    return config.value_dim // new_num_heads - config.value_dim // config.layer_num_heads[layer]


def summary_lines(record: dict) -> list[str]:
    """The printed summary of an expansion record (what, how, parameters, state)."""
    what = next(k for k in ("num_heads", "head_k_dim", "state_size") if k in record)
    changes = ", ".join(f"layer {k}: {v['before']} -> {v['after']}" for k, v in record[what].items())
    p, s = record["parameters"], record["state"]
    return [
        f"StateX ({record['method']}, init {record['init']}"
        + (f", dt/A {record['dt_init']}" if "dt_init" in record else "")
        + f", seed {record['seed']}): {what} {changes}",
        f"parameters: {p['before']:,} -> {p['after']:,} (+{p['added']:,}, "
        f"{100 * p['added'] / p['before']:.3f}%)",
        f"state per sequence: {s['elements_per_sequence_before']:,} -> {s['elements_per_sequence_after']:,} "
        f"elements, {s['bytes_per_sequence_before'] / 2**20:.3f} -> {s['bytes_per_sequence_after'] / 2**20:.3f} MiB "
        f"(x{s['ratio']:.3f})",
    ]


def read_provenance(src) -> dict:
    import json
    from pathlib import Path

    path = Path(src) / "statex.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"unreadable_statex_json": str(path)}


def expand_checkpoint(base: str, out: str, every: int | None = None, layers: str | list[int] | None = None,
                      heads: int | None = None, state_size: int | None = None, init: str = "reinit",
                      seed: int = 0, overwrite: bool = False, dt_init: str | None = None,
                      head_k_dim: int | None = None) -> dict:
    """Load ``base``, expand, write ``out`` (atomically) with statex.json; returns the record."""
    from pathlib import Path

    from model_registry.checkpoint import load_model, save_checkpoint

    if Path(out).exists() and not overwrite:
        raise UsageError(f"{out} already exists (pass --overwrite to replace it)")
    model = load_model(base)
    family = "gla" if model.config.model_type == "statex_gla" else "mamba2"
    chosen = choose_layers(model.config.num_hidden_layers, every=every, layers=layers)
    if family == "gla":
        if state_size is not None:
            raise UsageError("--state-size is for Mamba2; a GLA layer grows its state by merging heads (--heads)")
        if dt_init is not None:
            raise UsageError("--dt-init is for Mamba2 (GLA has no dt_bias / A_log)")
        if init == "preserve":
            if heads is not None:
                raise UsageError("--init preserve keeps the heads and widens their keys (--head-k-dim); "
                                 "--heads is for the merge inits (reinit, inherit)")
            if head_k_dim is None:
                head_k_dim = 4 * model.config.head_dims(chosen[0])[1]
            exp = widen_gla_keys(model, chosen, head_k_dim, seed)
        else:
            if head_k_dim is not None:
                raise UsageError("--head-k-dim is for --init preserve (widen keys); the merge inits take --heads")
            exp = expand_gla_heads(model, chosen, 1 if heads is None else heads, init, seed)
    else:
        if heads is not None or head_k_dim is not None:
            raise UsageError(f"--{'heads' if heads is not None else 'head-k-dim'} is for GLA; "
                             "a Mamba2 layer grows its state with --state-size")
        if state_size is None:  # the reference code's factor
            state_size = 4 * model.config.layer_state_size[chosen[0]]
        exp = expand_mamba2_state(model, chosen, state_size, init, seed, dt_init or "official")
    record = exp.record(model)
    record["base"] = str(Path(base).resolve())
    provenance = {"kind": "statex expanded checkpoint", "expansion": record,
                  "base_provenance": read_provenance(base)}
    save_checkpoint(exp.model, out, tokenizer_src=base, provenance=provenance, overwrite=overwrite)
    return record
