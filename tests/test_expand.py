"""StateX expansion on tiny models: what changes, what does not, shapes,
parameter and state-size formulas, init rules, and the three execution paths."""
from __future__ import annotations

import json
import math

import pytest
import torch

from model_registry.testing import build_tiny_model, make_tiny_checkpoint
from training.cli import main as cli
from training.expand import (expand_gla_heads, expand_mamba2_state, gla_added_parameters,
                             mamba2_added_parameters, widen_gla_keys)

LAYERS = [0, 2]


def _base(family, **kw):
    return build_tiny_model(family, expanded=False, seed=int(torch.randint(0, 2**31 - 1, ())), **kw)


def _expand(model, family, init="reinit", seed=0):
    if family == "gla":
        return expand_gla_heads(model, LAYERS, 1, init, seed).model
    return expand_mamba2_state(model, LAYERS, 4 * model.config.state_size, init, seed).model


CASES = [("gla", "reinit"), ("gla", "inherit"), ("mamba2", "reinit"), ("mamba2", "merge_copy"),
         ("mamba2", "merge_zero"), ("mamba2", "preserve")]


def _changed(family, init, layer) -> set[str]:
    """Tensors of an expanded layer the method is allowed to change."""
    if family == "gla":
        p = f"model.layers.{layer}."
        if init == "inherit":
            return {p + "attn.g_norm_swish_gate.weight", p + "attn_norm.weight"}
        return {k for k in _KEYS["gla"] if k.startswith(p + "attn.")} | {p + "attn_norm.weight"}
    p = f"backbone.layers.{layer}.mixer."
    return {p + n for n in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "norm.weight")}


_KEYS = {f: list(build_tiny_model(f, expanded=False).state_dict()) for f in ("gla", "mamba2")}


@pytest.mark.parametrize("family,init", CASES)
def test_everything_outside_the_method_is_bit_identical(family, init):
    base = _base(family)
    new = _expand(base, family, init)
    old_sd, new_sd = base.state_dict(), new.state_dict()
    assert set(old_sd) == set(new_sd)
    allowed = set().union(*(_changed(family, init, i) for i in LAYERS))
    for k, v in old_sd.items():
        if k not in allowed:
            assert torch.equal(v, new_sd[k]), k
    if family == "mamba2":   # inside the grown tensors: z, x, dt rows and x conv channels are kept too
        cfg = base.config
        I, N, N2, G = cfg.intermediate_size, cfg.state_size, 4 * cfg.state_size, cfg.n_groups
        for i in LAYERS:
            p = f"backbone.layers.{i}.mixer."
            w0, w1 = old_sd[p + "in_proj.weight"], new_sd[p + "in_proj.weight"]
            assert torch.equal(w1[:2 * I], w0[:2 * I])                              # z | x
            assert torch.equal(w1[2 * I + 2 * G * N2:], w0[2 * I + 2 * G * N:])     # dt
            for t in ("conv1d.weight", "conv1d.bias"):
                assert torch.equal(new_sd[p + t][:I], old_sd[p + t][:I])             # x channels


@pytest.mark.parametrize("family,init", CASES)
def test_expanded_layers_have_the_documented_shapes(family, init):
    base = _base(family)
    new = _expand(base, family, init)
    cfg, sd = new.config, new.state_dict()
    for i in range(cfg.num_hidden_layers):
        if family == "gla":
            H = 1 if i in LAYERS else base.config.num_heads
            assert cfg.layer_num_heads[i] == H
            assert tuple(sd[f"model.layers.{i}.attn.g_norm_swish_gate.weight"].shape) == (cfg.value_dim // H,)
            for name in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj"):   # projections keep their shape
                key = f"model.layers.{i}.attn.{name}.weight"
                assert sd[key].shape == base.state_dict()[key].shape
            assert cfg.state_spec().layers[i].tensors[0].shape == (H, cfg.key_dim // H, cfg.value_dim // H)
        else:
            N = 4 * base.config.state_size if i in LAYERS else base.config.state_size
            I, G, Hd = cfg.intermediate_size, cfg.n_groups, cfg.num_heads
            p = f"backbone.layers.{i}.mixer."
            assert cfg.layer_state_size[i] == N
            assert tuple(sd[p + "in_proj.weight"].shape) == (2 * I + 2 * G * N + Hd, cfg.hidden_size)
            assert tuple(sd[p + "conv1d.weight"].shape) == (I + 2 * G * N, 1, cfg.conv_kernel)
            ssm = cfg.state_spec().layers[i].tensors[1]
            assert ssm.shape == (Hd, cfg.head_dim, N)


@pytest.mark.parametrize("family,init", CASES)
def test_parameter_delta_equals_the_formula(family, init):
    base = _base(family)
    new = _expand(base, family, init)
    delta = sum(p.numel() for p in new.parameters()) - sum(p.numel() for p in base.parameters())
    cfg = base.config
    if family == "gla":   # only the output-norm weight grows: V - V/H per layer
        assert delta == len(LAYERS) * (cfg.value_dim - cfg.value_dim // cfg.num_heads)
        assert delta == sum(gla_added_parameters(cfg, i, 1) for i in LAYERS)
    else:                 # 2*G*dN*(d_model + d_conv + 1) per layer (conv bias on, in_proj bias off)
        dN = 3 * cfg.state_size
        assert delta == len(LAYERS) * 2 * cfg.n_groups * dN * (cfg.hidden_size + cfg.conv_kernel + 1)
        assert delta == sum(mamba2_added_parameters(cfg, i, 4 * cfg.state_size) for i in LAYERS)


@pytest.mark.parametrize("use_bias,use_conv_bias,n_groups", [(False, True, 1), (True, False, 2), (True, True, 2)])
def test_mamba2_formula_against_the_real_module(use_bias, use_conv_bias, n_groups):
    """The formula counts exactly what a Mamba2 mixer with a larger d_state adds."""
    from model_registry import StateXMamba2ForCausalLM
    from model_registry.configs import StateXMamba2Config
    from model_registry.mamba2 import Mamba2Mixer

    def config(state_size):   # tiny_mamba2_config fixes one group; this needs two as well
        return StateXMamba2Config(vocab_size=64, hidden_size=64, num_hidden_layers=2, state_size=state_size,
                                  head_dim=16, n_groups=n_groups, use_bias=use_bias, use_conv_bias=use_conv_bias)

    cfg, big = config(16), config(64)
    count = lambda c: sum(p.numel() for p in Mamba2Mixer(c, 0).parameters())  # noqa: E731
    assert count(big) - count(cfg) == mamba2_added_parameters(cfg, 0, 64)
    if not use_conv_bias:
        assert count(big) - count(cfg) == 2 * n_groups * 48 * (64 + 1 + 4)
    model = StateXMamba2ForCausalLM(cfg)
    for init in ("reinit", "merge_copy"):
        new = expand_mamba2_state(model, [1], 64, init).model
        assert (sum(p.numel() for p in new.parameters()) - sum(p.numel() for p in model.parameters())
                == mamba2_added_parameters(cfg, 1, 64))
        new(torch.randint(0, 64, (1, 20)))   # and the grown layer runs


@pytest.mark.parametrize("family", ["gla", "mamba2"])
def test_state_bytes_grow_by_the_documented_factor(family):
    base = _base(family)
    new = _expand(base, family)
    s0, s1 = base.state_spec(), new.state_spec()
    cfg = base.config
    for i in range(cfg.num_hidden_layers):
        a, b = s0.layers[i], s1.layers[i]
        if i not in LAYERS:
            assert a == b
        elif family == "gla":   # merging H heads into H' multiplies the state by H/H'
            assert b.nbytes == a.nbytes * cfg.num_heads
        else:                   # ssm state x N'/N; the conv window grows with the B/C channels
            conv0, ssm0 = a.tensors
            conv1, ssm1 = b.tensors
            assert ssm1.nbytes == 4 * ssm0.nbytes
            I, G, N = cfg.intermediate_size, cfg.n_groups, cfg.state_size
            assert conv1.nbytes * (I + 2 * G * N) == conv0.nbytes * (I + 2 * G * 4 * N)
    if family == "gla":
        per = s0.layers[0].nbytes
        assert s1.bytes_per_sequence == s0.bytes_per_sequence + len(LAYERS) * (cfg.num_heads - 1) * per


def test_gla_init_rules():
    base = _base("gla")
    cfg = base.config
    re, inh = (_expand(base, "gla", m).state_dict() for m in ("reinit", "inherit"))
    old = base.state_dict()
    for i in LAYERS:
        p = f"model.layers.{i}."
        assert torch.equal(re[p + "attn.g_norm_swish_gate.weight"], torch.ones(cfg.value_dim))
        assert torch.equal(re[p + "attn_norm.weight"], torch.ones(cfg.hidden_size))
        assert torch.equal(re[p + "attn.gk_proj.1.bias"], torch.zeros(cfg.key_dim))
        for name in ("q_proj", "v_proj", "o_proj", "gk_proj.0"):
            w = re[p + f"attn.{name}.weight"]
            bound = 2 ** -2.5 * math.sqrt(6 / sum(w.shape))           # Xavier-uniform, gain 2^-2.5
            assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
            assert not torch.equal(w, old[p + f"attn.{name}.weight"])
        # inherit: projections kept, the per-head norm tiled over the merged heads
        assert torch.equal(inh[p + "attn.q_proj.weight"], old[p + "attn.q_proj.weight"])
        assert torch.equal(inh[p + "attn.g_norm_swish_gate.weight"],
                           old[p + "attn.g_norm_swish_gate.weight"].repeat(cfg.num_heads))


@pytest.mark.parametrize("init", ["reinit", "inherit"])
def test_gla_short_conv_carries_over_unchanged(init):
    """Merging heads moves no channel: q, k and v are flat [Kd | Kd | Vd] when the
    depthwise short conv reads them, the head split comes after. So an expanded
    layer keeps its conv weights (both inits) and its conv window's shape, and
    with inherit its window after a sequence is the base model's."""
    base = _base("gla", use_short_conv=True)
    new = _expand(base, "gla", init)
    old_sd, new_sd = base.state_dict(), new.state_dict()
    conv_keys = [k for k in old_sd if "_conv1d." in k]
    assert len(conv_keys) == 3 * base.config.num_hidden_layers
    assert all(torch.equal(new_sd[k], old_sd[k]) for k in conv_keys)
    for l0, l1 in zip(base.state_spec().layers, new.state_spec().layers):
        assert l1.tensors[0] == l0.tensors[0] and l1.tensors[0].name == "conv"
    if init == "inherit":
        ids = torch.randint(0, base.config.vocab_size, (2, 19))
        with torch.no_grad():
            want = base(ids, return_states=True).states[LAYERS[0]]["conv"]
            got = new(ids, return_states=True).states[LAYERS[0]]["conv"]
        assert LAYERS[0] == 0 and torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_mamba2_init_rules():
    base = _base("mamba2")
    cfg = base.config
    I, N, G, H, D = cfg.intermediate_size, cfg.state_size, cfg.n_groups, cfg.num_heads, cfg.hidden_size
    old = base.state_dict()
    out = {m: _expand(base, "mamba2", m).state_dict() for m in ("reinit", "merge_copy", "merge_zero", "preserve")}
    for i in LAYERS:
        p = f"backbone.layers.{i}.mixer."
        B_old = old[p + "in_proj.weight"][2 * I:2 * I + G * N]
        C_old = old[p + "in_proj.weight"][2 * I + G * N:2 * I + 2 * G * N]
        cb_old = old[p + "conv1d.weight"][I:I + G * N]
        for m, sd in out.items():
            assert torch.equal(sd[p + "dt_bias"], torch.ones(H))
            assert torch.allclose(sd[p + "A_log"], torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
            assert torch.equal(sd[p + "norm.weight"], old[p + "norm.weight"] if m == "preserve" else torch.ones(I))
            assert torch.equal(sd[p + "D"], old[p + "D"])
            B = sd[p + "in_proj.weight"][2 * I:2 * I + 4 * G * N]
            C = sd[p + "in_proj.weight"][2 * I + 4 * G * N:2 * I + 8 * G * N]
            cb = sd[p + "conv1d.weight"][I:I + 4 * G * N]
            if m == "reinit":   # PyTorch default Linear / Conv1d init: U(+-1/sqrt(fan_in))
                assert B.abs().max() <= 1 / math.sqrt(D) and B.abs().max() > 0.8 / math.sqrt(D)
                assert cb.abs().max() <= 1 / math.sqrt(cfg.conv_kernel)
            elif m == "merge_copy":
                assert torch.equal(B, B_old.repeat(4, 1)) and torch.equal(C, C_old.repeat(4, 1))
                assert torch.equal(cb, cb_old.repeat(4, 1, 1))
            elif m == "merge_zero":
                assert torch.equal(B[:N], B_old) and not B[N:].any()
                assert torch.equal(C[:N], C_old) and not C[N:].any() and not cb[N:].any()
            else:   # preserve: old rows, then random B rows and zero C rows (conv: zero C bias)
                assert torch.equal(B[:N], B_old) and B[N:].abs().max() <= 1 / math.sqrt(D) and B[N:].any()
                assert torch.equal(C[:N], C_old) and not C[N:].any()
                c_bias = sd[p + "conv1d.bias"][I + 4 * G * N:I + 8 * G * N]
                assert not c_bias[N:].any()


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_preserve_computes_the_base_function_and_its_new_state_learns(n_groups):
    """``preserve`` with dt / A inherited: the expanded model's logits are the base's,
    and one backward step reaches the new C rows (merge_zero's stay at zero gradient:
    the new dimensions of its state are never written, so nothing trains them)."""
    base = _base("mamba2", n_groups=n_groups).float()
    cfg = base.config
    I, N, G = cfg.intermediate_size, cfg.state_size, cfg.n_groups
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        want = base(ids).logits
    grads = {}
    for init in ("preserve", "merge_zero"):
        new = expand_mamba2_state(base, LAYERS, 4 * N, init, seed=3, dt_init="inherit").model.float()
        if init == "preserve":
            with torch.no_grad():
                assert torch.allclose(new(ids).logits, want, rtol=1e-4, atol=1e-4)
            sd, old = new.state_dict(), base.state_dict()
            for i in LAYERS:
                p = f"backbone.layers.{i}.mixer."
                assert torch.equal(sd[p + "norm.weight"], old[p + "norm.weight"])
                B = sd[p + "in_proj.weight"][2 * I:2 * I + 4 * G * N].reshape(G, 4 * N, -1)
                B_old = old[p + "in_proj.weight"][2 * I:2 * I + G * N].reshape(G, N, -1)
                assert torch.equal(B[:, :N], B_old) and B[:, N:].any()
        new(ids).logits.float().pow(2).mean().backward()
        grads[init] = []
        for i in LAYERS:
            g = new.backbone.layers[i].mixer.in_proj.weight.grad
            C_new = g[2 * I + 4 * G * N:2 * I + 8 * G * N].reshape(G, 4 * N, -1)[:, N:]
            grads[init].append(float(C_new.abs().max()))
    assert min(grads["preserve"]) > 0
    assert max(grads["merge_zero"]) == 0


@pytest.mark.parametrize("conv", [False, True], ids=["gla", "gla_conv"])
def test_gla_preserve_widens_keys_computes_the_base_function_and_its_new_keys_learn(conv):
    """GLA's ``preserve``: the heads stay, each head's keys grow K -> 4K. The logits are the
    base's exactly (new q rows zero, the base's score scale kept), only the widened tensors
    change (old rows kept per head, new decay-gate rows the head's old ones), the parameter
    and state bookkeeping follow, and one backward step reaches the new q rows."""
    base = _base("gla", use_short_conv=conv).float()
    cfg = base.config
    H, K, V = cfg.head_dims(0)
    D, W, r = cfg.hidden_size, cfg.conv_size, cfg.gate_low_rank_dim
    exp = widen_gla_keys(base, LAYERS, 4 * K, seed=3)
    new, ncfg = exp.model.float(), exp.model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.allclose(new(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    assert ncfg.layer_num_heads == cfg.layer_num_heads
    assert ncfg.layer_key_dim == [4 * H * K if i in LAYERS else H * K for i in range(4)]
    assert [ncfg.attn_scale(i) for i in range(4)] == [K ** -0.5] * 4          # the base's scale, everywhere
    for i in range(4):
        assert ncfg.state_spec().layers[i].tensors[-1].shape == (H, 4 * K if i in LAYERS else K, V)

    old, sd = base.state_dict(), new.state_dict()
    grown = {"q_proj.weight", "k_proj.weight", "gk_proj.1.weight", "gk_proj.1.bias"}
    grown |= {"q_conv1d.weight", "k_conv1d.weight"} if conv else set()
    for k_, v in old.items():
        if not any(k_ == f"model.layers.{i}.attn.{n}" for i in LAYERS for n in grown):
            assert torch.equal(v, sd[k_]), k_
    for i in LAYERS:
        p = f"model.layers.{i}.attn."
        for n in grown:
            w0, w1 = old[p + n].reshape(H, K, -1), sd[p + n].reshape(H, 4 * K, -1)
            assert torch.equal(w1[:, :K], w0), n                                 # per head, the old rows first
            if n == "q_proj.weight":
                assert not w1[:, K:].any()
            elif n.startswith("gk_proj"):
                assert torch.equal(w1[:, K:], w0.repeat(1, 3, 1))                # the head's decays, again
            else:
                assert w1[:, K:].abs().min() > 0
    added = sum(p.numel() for p in new.parameters()) - sum(p.numel() for p in base.parameters())
    assert added == len(LAYERS) * H * 3 * K * (2 * D + r + 1 + (2 * W if conv else 0))
    assert exp.record(base)["parameters"]["added"] == added
    assert exp.record(base)["method"] == "widen keys" and exp.record(base)["head_k_dim"]["0"] == {
        "before": K, "after": 4 * K}

    new.train()
    new(ids).logits.float().pow(2).mean().backward()
    for i in LAYERS:
        g = new.model.layers[i].attn.q_proj.weight.grad.reshape(H, 4 * K, D)
        assert g[:, K:].abs().max() > 0


def test_gla_merging_a_widened_layer_drops_its_kept_scale():
    base = _base("gla")
    K = base.config.head_dims(0)[1]
    wide = widen_gla_keys(base, LAYERS, 2 * K).model
    merged = expand_gla_heads(wide, [0], 1, "inherit").model.config
    assert merged.attn_scale(0) == (2 * K * 4) ** -0.5 and merged.attn_scale(2) == K ** -0.5


@pytest.mark.parametrize("dt_init", ["official", "inherit", "init"])
def test_mamba2_dt_init_modes(dt_init):
    """dt_bias / A_log of an expanded layer: the reference code's constants, the
    base layer's values, or mamba_ssm's draw (dt in [dt_min, dt_max], A in [1, 16])."""
    base = _base("mamba2")
    cfg, old = base.config, base.state_dict()
    H = cfg.num_heads
    exp = expand_mamba2_state(base, LAYERS, 4 * cfg.state_size, "reinit", seed=5, dt_init=dt_init)
    assert exp.record(base)["dt_init"] == dt_init
    sd = exp.model.state_dict()
    for i in LAYERS:
        p = f"backbone.layers.{i}.mixer."
        dt_bias, A_log = sd[p + "dt_bias"], sd[p + "A_log"]
        if dt_init == "official":
            assert torch.equal(dt_bias, torch.ones(H))
            assert torch.allclose(A_log, torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        elif dt_init == "inherit":
            assert torch.equal(dt_bias, old[p + "dt_bias"]) and torch.equal(A_log, old[p + "A_log"])
        else:
            dt = torch.nn.functional.softplus(dt_bias)
            assert dt.min() >= cfg.time_step_min * 0.999 and dt.max() <= cfg.time_step_max * 1.001
            assert A_log.exp().min() >= 1 and A_log.exp().max() <= 16
            assert not torch.equal(dt_bias, old[p + "dt_bias"]) and not torch.equal(A_log, old[p + "A_log"])
    if dt_init == "init":   # reproducible from the seed
        again = expand_mamba2_state(base, LAYERS, 4 * cfg.state_size, "reinit", seed=5, dt_init=dt_init)
        assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in sd.items())


def test_expansion_is_reproducible_from_its_seed():
    base = _base("mamba2")
    a, b, c = (_expand(base, "mamba2", seed=s).state_dict() for s in (3, 3, 4))
    key = "backbone.layers.0.mixer.in_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a[key], c[key])


@pytest.mark.parametrize("family", ["gla", "mamba2"])
def test_expanded_model_runs_all_three_paths_consistently(family):
    """(a) whole sequence, (c) prefill of a prefix into a pool slot, (b) decode the rest."""
    new = _expand(_base(family), family)
    T, cut = 45, 29
    ids = torch.randint(0, new.config.vocab_size, (T,))
    with torch.no_grad():
        full = new(ids[None]).logits[0]
        pools = new.allocate_state_pools(2)
        slot = torch.tensor([1], dtype=torch.int32)
        pre = new.prefill(ids[:cut], torch.tensor([0, cut], dtype=torch.int32), slot, torch.tensor([False]), pools,
                          all_logits=True)
        dec = torch.stack([new.decode(ids[t:t + 1], slot, pools)[0] for t in range(cut, T)])
    got = torch.cat([pre, dec])
    assert ((got - full).norm() / full.norm()).item() < 1e-4


# --- the command line ------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: make_tiny_checkpoint(root / f, f, expanded=False, seed=1) for f in ("gla", "mamba2")}


def test_cli_expand_writes_checkpoint_and_provenance(checkpoints, tmp_path, capsys):
    from model_registry.checkpoint import load_model

    out = tmp_path / "x"
    assert cli(["expand", "--base", str(checkpoints["mamba2"]), "--out", str(out), "--every", "2",
                "--init", "merge_zero"]) == 0
    printed = capsys.readouterr().out
    assert "16 -> 64" in printed and "parameters" in printed and "state per sequence" in printed
    rec = json.loads((out / "statex.json").read_text())["expansion"]
    assert rec["layers"] == [0, 2] and rec["init"] == "merge_zero" and rec["dt_init"] == "official"
    assert rec["state"]["bytes_per_sequence_after"] > rec["state"]["bytes_per_sequence_before"]
    assert rec["parameters"]["added"] == 2 * mamba2_added_parameters(load_model(checkpoints["mamba2"]).config, 0, 64)
    assert load_model(out).config.layer_state_size == [64, 16, 64, 16]
    assert (out / "tokenizer.json").is_file()
    out2 = tmp_path / "y"
    assert cli(["expand", "--base", str(checkpoints["mamba2"]), "--out", str(out2), "--layers", "1",
                "--dt-init", "inherit"]) == 0
    assert json.loads((out2 / "statex.json").read_text())["expansion"]["dt_init"] == "inherit"
    assert "dt/A inherit" in capsys.readouterr().out


def test_cli_expand_gla_preserve_widens_keys(checkpoints, tmp_path, capsys):
    from model_registry.checkpoint import load_model

    out = tmp_path / "w"
    assert cli(["expand", "--base", str(checkpoints["gla"]), "--out", str(out), "--every", "2",
                "--init", "preserve"]) == 0
    assert "widen keys" in capsys.readouterr().out
    rec = json.loads((out / "statex.json").read_text())["expansion"]
    assert rec["method"] == "widen keys" and rec["head_k_dim"] == {"0": {"before": 8, "after": 32},
                                                                    "2": {"before": 8, "after": 32}}
    cfg = load_model(out).config
    assert cfg.layer_key_dim == [128, 32, 128, 32] and cfg.layer_num_heads == [4, 4, 4, 4]
    assert cfg.attn_scale(0) == 8 ** -0.5 and cfg.attn_scale(1) == 8 ** -0.5


@pytest.mark.parametrize("case,args", [
    ("unknown arch", ["--every", "2"]),
    ("layer out of range", ["--layers", "0,7"]),
    ("heads not dividing", ["--layers", "1", "--heads", "3"]),
    ("non-multiple state size", ["--layers", "1", "--state-size", "40"]),
    ("heads on mamba2", ["--layers", "1", "--heads", "2"]),
    ("unknown init", ["--layers", "1", "--init", "merge_copy"]),
    ("missing base", ["--layers", "1"]),
    ("dt init on gla", ["--layers", "1", "--dt-init", "init"]),
    ("unknown dt init", ["--layers", "1", "--dt-init", "zero"]),
    ("heads with preserve", ["--layers", "1", "--init", "preserve", "--heads", "1"]),
    ("head-k-dim with a merge", ["--layers", "1", "--head-k-dim", "32"]),
    ("non-multiple head-k-dim", ["--layers", "1", "--init", "preserve", "--head-k-dim", "12"]),
    ("head-k-dim on mamba2", ["--layers", "1", "--head-k-dim", "32"]),
])
def test_cli_expand_bad_input_is_one_line_exit_2_no_output(case, args, checkpoints, tmp_path, capsys):
    special = {"unknown arch": tmp_path / "llama", "non-multiple state size": checkpoints["mamba2"],
               "unknown dt init": checkpoints["mamba2"],
               "heads on mamba2": checkpoints["mamba2"], "missing base": tmp_path / "nowhere",
               "head-k-dim on mamba2": checkpoints["mamba2"]}
    base = special.get(case, checkpoints["gla"])
    if case == "unknown arch":
        base.mkdir()
        (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    out = tmp_path / "out"
    assert cli(["expand", "--base", str(base), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("statex-train expand: error: ") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
