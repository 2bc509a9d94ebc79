"""Damaged inputs to ``statex-train``: truncated or corrupt weights,
rejected pickles, NaN or integer weights, broken trainer state. Each is one
line on stderr naming the file, exit 2; ``--resume`` falls back to the last
good checkpoint; half-written step directories are cleaned up; tokenizers are
never loaded with remote code."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_registry.checkpoint import load_model
from model_registry.testing import make_tiny_checkpoint
from training.cli import main as cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("errors") / "gla", "gla", seed=4)


def one_line_error(capsys, code: int, command: str) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"statex-train {command}: error: ") and err.count("\n") == 1, (code, err)
    return err


class Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def damage(src: Path, dst: Path, case: str) -> str:
    """A copy of ``src`` damaged as ``case``; returns what the error must name."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if case == "truncated weights":
        data = weights.read_bytes()
        weights.write_bytes(data[:len(data) // 2])
        return str(weights)
    if case == "garbage weights":
        weights.write_bytes(b"\x00" * 64)
        return str(weights)
    if case == "rejected pickle":
        weights.unlink()
        (dst / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
        return str(dst / "pytorch_model.bin")
    if case == "broken config":
        (dst / "config.json").write_text('{"model_type": ')
        return str(dst / "config.json")
    sd = load_file(str(weights))
    name = next(k for k in sd if k.endswith("weight") and sd[k].dim() == 2)
    if case == "nan weights":
        sd[name][0, 0] = float("nan")
    elif case == "integer weights":
        sd[name] = sd[name].to(torch.int64)
    save_file(sd, str(weights))
    return name


@pytest.mark.parametrize("case", ["truncated weights", "garbage weights", "rejected pickle", "broken config",
                                  "nan weights", "integer weights"])
def test_import_of_a_damaged_checkpoint_is_one_line_exit_2(case, ckpt, tmp_path, capsys):
    src = tmp_path / "src"
    named = damage(ckpt, src, case)
    code = cli(["import", "--src", str(src), "--out", str(tmp_path / "out")])
    err = one_line_error(capsys, code, "import")
    assert named in err, err
    assert not (tmp_path / "out").exists()
    assert "pickle code ran" not in capsys.readouterr().out


def train_args(model, out, steps):
    return ["train", "--model", str(model), "--out", str(out), "--data", "passkey?min_len=48&max_len=64",
            "--seq-len", "64", "--batch-size", "2", "--max-steps", str(steps), "--save-every", "2", "--no-progress"]


def test_resume_falls_back_to_the_last_good_checkpoint_and_cleans_up(ckpt, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert cli([*train_args(ckpt, out, 6), "--halt-after-step", "4"]) == 0
    steps = sorted((out / "checkpoints").glob("step_*"))
    assert [p.name for p in steps] == ["step_0000002", "step_0000004"]
    # a step directory is a loadable model checkpoint (its optimizer.safetensors is not the model's)
    assert load_model(steps[0]).config.model_type == "statex_gla"
    # the newest is damaged, and a killed save left a temporary directory behind
    weights = steps[1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    stale = out / "checkpoints" / ".step_0000006.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    assert cli([*train_args(ckpt, out, 6), "--resume"]) == 0
    assert "step_0000004" in caplog.text and "trying the checkpoint before it" in caplog.text
    assert not stale.exists()
    steps_logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3, 4, 5, 6]            # steps 3 and 4 run again from step 2
    assert (out / "model" / "config.json").is_file()


@pytest.mark.parametrize("case", ["trainer_state.json", "optimizer.safetensors"])
def test_resume_with_no_loadable_checkpoint_is_one_line_exit_2(case, ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli([*train_args(ckpt, out, 4), "--halt-after-step", "2"]) == 0
    f = next((out / "checkpoints").glob("step_*")) / case
    f.write_bytes(f.read_bytes()[:20])
    capsys.readouterr()
    err = one_line_error(capsys, cli([*train_args(ckpt, out, 4), "--resume"]), "train")
    assert str(f) in err, err


def test_tokenizers_never_load_remote_code(ckpt, monkeypatch):
    from transformers import AutoTokenizer

    from statex_serve.engine.loading import load_tokenizer
    seen = {}
    real = AutoTokenizer.from_pretrained

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    load_tokenizer(ckpt)
    assert seen.get("trust_remote_code") is False
