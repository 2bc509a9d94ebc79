"""Import from the real upstream formats, export to ours, reload: identical logits;
clear errors; nothing half-written."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model_registry.checkpoint import CheckpointError, load_model, load_state_dict
from model_registry.configs import ConfigError
from model_registry.convert import import_checkpoint
from model_registry.testing import make_tiny_checkpoint
from model_registry.tokenizer import save_byte_tokenizer


def _seed():
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))


def short_conv_reference(x, weight):
    """fla's ShortConvolution without a cache: silu(Conv1d(padding=W-1)) cut to the
    first T outputs. x [B, T, C], weight [C, 1, W]."""
    T = x.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight, padding=weight.shape[-1] - 1, groups=weight.shape[0])
    return F.silu(y[..., :T]).transpose(1, 2)


def fla_reference_logits(fla_model, ids):
    """fla's GLA math written out from fla's own modules' weights and fla's naive
    recurrence (fla's fused kernels need CUDA): an independent check of ours. Also
    reads our models (same tensor names; per-layer heads from ``layer_num_heads``)."""
    from fla.ops.gla.naive import naive_recurrent_gla

    cfg = fla_model.config
    sd = fla_model.state_dict()

    def rms(x, w, eps=cfg.norm_eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    h = F.embedding(ids, sd["model.embeddings.weight"])
    for i in range(cfg.num_hidden_layers):
        H = getattr(cfg, "layer_num_heads", [cfg.num_heads] * cfg.num_hidden_layers)[i]
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "attn_norm.weight"])
        q, k, v, gt = (F.linear(x, sd[p + f"attn.{n}_proj.weight"]) for n in "qkvg")
        if cfg.use_short_conv:   # fla: projection -> conv + silu, before the head split and the gate
            q, k, v = (short_conv_reference(t, sd[p + f"attn.{n}_conv1d.weight"]) for t, n in zip((q, k, v), "qkv"))
        gk = F.linear(F.linear(x, sd[p + "attn.gk_proj.0.weight"]), sd[p + "attn.gk_proj.1.weight"],
                      sd[p + "attn.gk_proj.1.bias"])
        gk = F.logsigmoid(gk) / 16
        split = lambda t: t.unflatten(-1, (H, -1))  # noqa: E731
        o, _ = naive_recurrent_gla(split(q), split(k), split(v), split(gk))
        o = rms(o, sd[p + "attn.g_norm_swish_gate.weight"]) * F.silu(split(gt))
        h = h + F.linear(o.flatten(-2), sd[p + "attn.o_proj.weight"])
        x = rms(h, sd[p + "mlp_norm.weight"])
        mlp = F.silu(F.linear(x, sd[p + "mlp.gate_proj.weight"])) * F.linear(x, sd[p + "mlp.up_proj.weight"])
        h = h + F.linear(mlp, sd[p + "mlp.down_proj.weight"])
    return F.linear(rms(h, sd["model.norm.weight"]), sd["lm_head.weight"])


def test_fla_gla_checkpoint_imports_exports_and_reloads(tmp_path):
    from fla.models import GLAConfig, GLAForCausalLM

    _seed()
    src = tmp_path / "fla-gla"
    fla = GLAForCausalLM(GLAConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_heads=4,
                                   attn_mode="fused_chunk"))  # what fla-hub configs say
    fla.save_pretrained(src)
    save_byte_tokenizer(src)
    out = import_checkpoint(src, tmp_path / "ours")
    assert json.loads((out / "config.json").read_text())["model_type"] == "statex_gla"
    assert (out / "tokenizer.json").is_file() and (out / "statex.json").is_file()
    ours = load_model(out)
    ids = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        logits = ours(ids).logits
        assert ((logits - fla_reference_logits(fla, ids)).norm() / logits.norm()) < 1e-4
        # export again (our format -> our format) and reload: identical
        again = import_checkpoint(out, tmp_path / "again")
        assert torch.equal(load_model(again)(ids).logits, logits)


def test_fla_gla_with_short_conv_imports_exports_and_reloads(tmp_path):
    """fla's use_short_conv: the q/k/v conv weights load by name, the logits are
    fla's math, and our export round-trips bit for bit."""
    from fla.models import GLAConfig, GLAForCausalLM

    _seed()
    src = tmp_path / "fla-gla-conv"
    fla = GLAForCausalLM(GLAConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_heads=4,
                                   use_short_conv=True, conv_size=4))
    with torch.no_grad():   # fla 0.6 draws the convs from N(0, 0.02): make them matter
        for name, w in fla.named_parameters():
            if "conv1d" in name:
                w.uniform_(-0.5, 0.5)
    fla.save_pretrained(src)
    save_byte_tokenizer(src)
    out = import_checkpoint(src, tmp_path / "ours")
    ours = load_model(out)
    assert ours.config.use_short_conv and ours.config.conv_size == 4
    assert torch.equal(ours.state_dict()["model.layers.1.attn.v_conv1d.weight"],
                       fla.state_dict()["model.layers.1.attn.v_conv1d.weight"])
    ids = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        logits = ours(ids).logits
        assert ((logits - fla_reference_logits(fla, ids)).norm() / logits.norm()) < 1e-4
        again = load_model(import_checkpoint(out, tmp_path / "again"))
        assert again.config.use_short_conv and torch.equal(again(ids).logits, logits)


def _hf_mamba2(n_groups=1):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    _seed()
    hf = Mamba2ForCausalLM(Mamba2Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, head_dim=16,
                                        num_heads=8, state_size=16, n_groups=n_groups, chunk_size=16,
                                        tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for layer in hf.backbone.layers:
            layer.mixer.D.normal_()
            layer.mixer.norm.weight.normal_(1.0, 0.2)
    return hf


def test_hf_mamba2_checkpoint_imports_exports_and_reloads(tmp_path):
    hf = _hf_mamba2(n_groups=2)
    hf.save_pretrained(tmp_path / "hf")
    out = import_checkpoint(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(out)
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        logits = ours(ids).logits
        assert ((logits - ref).norm() / ref.norm()) < 1e-4
        assert torch.equal(load_model(import_checkpoint(out, tmp_path / "again"))(ids).logits, logits)


def test_mamba_ssm_checkpoint_imports(tmp_path):
    """mamba_ssm layout: config.json with d_model/n_layer/ssm_cfg, pytorch_model.bin,
    `backbone.embedding`, vocab padded to pad_vocab_size_multiple, per-group norm."""
    hf = _hf_mamba2(n_groups=1)
    src = tmp_path / "mamba_ssm"
    src.mkdir()
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({
        "d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": 297,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 1, "chunk_size": 16},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 4,
        "tie_embeddings": True}))
    ours = load_model(import_checkpoint(src, tmp_path / "ours"))
    assert ours.config.vocab_size == 300
    ids = torch.randint(0, 300, (1, 33))
    with torch.no_grad():
        ref = hf(ids).logits
        assert ((ours(ids).logits - ref).norm() / ref.norm()) < 1e-4


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="unknown model_type 'llama'.*gla.*mamba2"):
        import_checkpoint(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "gla")
    sd = load_state_dict(ckpt)
    from safetensors.torch import save_file

    bad = dict(sd)
    del bad["model.layers.1.attn.q_proj.weight"]
    save_file(bad, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.attn\.q_proj\.weight \(shape \(32, 64\)\)"):
        load_model(ckpt)
    bad = dict(sd)
    bad["model.layers.0.attn.g_norm_swish_gate.weight"] = torch.ones(8)
    save_file(bad, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"g_norm_swish_gate\.weight has shape \(8,\), the config expects \(64,\)"):
        import_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left behind


def test_statex_train_import_cli(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "mamba2")
    ok = subprocess.run([sys.executable, "-m", "training.cli", "import", "--src", str(ckpt), "--out",
                         str(tmp_path / "out")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "StateXMamba2ForCausalLM" in ok.stdout and "MiB per sequence" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "training.cli", "import", "--src", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "out2")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "--src " in bad.stderr and "no such directory" in bad.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_checkpoints_get_umask_modes_not_owner_only(umask, tmp_path):
    """A checkpoint mounted into a container that runs as another user must be
    readable: the atomic write's temporary directory (mkdtemp: 0700) must not
    leave its mode on the result."""
    import os
    import stat

    old = os.umask(umask)
    try:
        ckpt = make_tiny_checkpoint(tmp_path / "tiny", "gla")
        imported = import_checkpoint(ckpt, tmp_path / "imported")
    finally:
        os.umask(old)
    for root in (ckpt, imported):
        assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~umask, oct(root.stat().st_mode)
        files = list(root.iterdir())
        assert {"config.json", "model.safetensors", "tokenizer.json", "statex.json"} <= {f.name for f in files}
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, (f, oct(f.stat().st_mode))


def test_gla_per_layer_key_widths_and_scales_round_trip_and_are_checked(tmp_path):
    """A widened GLA config saves its key widths and kept score scales and loads them back;
    an unwidened one saves neither (so editing hidden_size by hand leaves no stale widths);
    malformed entries are a ConfigError naming the field."""
    from transformers import AutoConfig

    from model_registry.configs import StateXGLAConfig
    from model_registry.testing import tiny_gla_config

    for widen in (False, True):
        cfg = tiny_gla_config(widen=widen, use_short_conv=True)
        cfg.save_pretrained(tmp_path / str(widen))
        saved = json.loads((tmp_path / str(widen) / "config.json").read_text())
        assert ("layer_key_dim" in saved) is widen and ("layer_attn_scale" in saved) is widen
        back = AutoConfig.from_pretrained(tmp_path / str(widen))
        assert back.layer_key_dim == cfg.layer_key_dim and back.layer_attn_scale == cfg.layer_attn_scale
        assert [back.head_dims(i) for i in range(4)] == [cfg.head_dims(i) for i in range(4)]
        assert [back.attn_scale(i) for i in range(4)] == [cfg.attn_scale(i) for i in range(4)]
    edited = json.loads((tmp_path / "False" / "config.json").read_text()) | {"hidden_size": 128}
    edited.pop("intermediate_size")
    assert StateXGLAConfig.from_dict(edited).layer_key_dim == [64] * 4
    for bad, says in (({"layer_key_dim": [32, 32]}, "layer_key_dim has 2 entries"),
                      ({"layer_key_dim": [32, 30, 32, 32]}, "layer 1: 4 heads do not divide key dim 30"),
                      ({"layer_attn_scale": [0.5, None, "x", None]}, "layer_attn_scale must hold"),
                      ({"layer_attn_scale": [0.0, None, None, None]}, "layer_attn_scale must hold")):
        with pytest.raises(ConfigError, match=says):
            tiny_gla_config(**bad)
