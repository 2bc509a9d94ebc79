"""Post-training on CPU with tiny models: the schedule, the optimizer groups,
loss going down, exact resume after an interruption, DDP, and bad input."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_registry.testing import build_tiny_model, make_tiny_checkpoint
from model_registry.tokenizer import EOS_ID, save_byte_tokenizer
from training.cli import main as cli
from training.data import TextCodec
from training.tasks import mqar
from training.train import TrainConfig, lr_at, param_groups, run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {f: make_tiny_checkpoint(root / f, f, expanded=True, seed=2) for f in ("gla", "mamba2")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus (a few stdlib modules) as files."""
    root = tmp_path_factory.mktemp("corpus")
    import json as json_mod
    import textwrap

    for mod in (json_mod, textwrap, random):
        Path(root, Path(mod.__file__).name).write_text(Path(mod.__file__).read_text())
    return root


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(model="", out="", lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, cfg, 100) == pytest.approx(1e-4) and min(lrs) >= 1e-4


def test_weight_decay_only_on_matrices():
    model = build_tiny_model("mamba2")
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_few_steps_reduce_loss_on_a_fixed_synthetic_batch(ckpts, tmp_path):
    """One MQAR document exactly one window long: every batch is the same batch."""
    tok = tmp_path / "tok"
    save_byte_tokenizer(tok)
    codec = TextCodec(tok / "tokenizer.json", EOS_ID)
    sample = mqar(random.Random(0), codec, 120, pairs=8)
    text = codec.decode(sample.ids)
    data = tmp_path / "fixed.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    seq = len(sample.ids) + 1   # the document and its EOS
    for family in ("gla", "mamba2"):
        out = tmp_path / family
        run(TrainConfig(model=str(ckpts[family]), out=str(out), data=[f"jsonl:{data}"], seq_len=seq, batch_size=2,
                        max_steps=12, warmup_steps=2, lr=1e-2, save_every=100, progress=False))
        losses = _losses(out)
        assert losses[-1] < 0.6 * losses[0], (family, losses)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("family,accum", [("gla", 2), ("mamba2", 1)])
def test_interrupted_run_resumes_to_the_same_loss_curve_exactly(family, accum, ckpts, corpus, tmp_path):
    data = [f"text:{corpus}?ext=.py@2", "mqar?min_len=32&max_len=96", "niah?min_len=64&max_len=96"]
    common = dict(model=str(ckpts[family]), data=data, seq_len=64, batch_size=2, grad_accum=accum, max_steps=8,
                  warmup_steps=2, lr=3e-3, save_every=3, progress=False)
    run(TrainConfig(out=str(tmp_path / "a"), **common))

    def die_at_5(step, _):   # like a kill: after checkpoint 3, before checkpoint 6
        if step == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(TrainConfig(out=str(tmp_path / "b"), **common), on_step=die_at_5)
    assert len(_losses(tmp_path / "b")) == 5
    summary = run(TrainConfig(out=str(tmp_path / "b"), resume=True, **common))
    assert summary["finished"]
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")          # exact, float for float
    wa, wb = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_0000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["tokens"] == 8 * 2 * 64 * accum


def test_gradient_checkpointing_gives_the_same_step(ckpts):
    from model_registry.checkpoint import load_model

    x = torch.randint(0, 256, (2, 40))
    grads = []
    for ckpt in (False, True):
        model = load_model(ckpts["gla"]).train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(x, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_train_cli_halts_resumes_and_exports(ckpts, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(ckpts["gla"]), "--out", str(out), "--data", "passkey?min_len=48&max_len=64",
            "--seq-len", "64", "--batch-size", "2", "--max-steps", "4", "--save-every", "2", "--no-progress"]
    assert cli([*args, "--halt-after-step", "2"]) == 0
    assert "continue with --resume" in capsys.readouterr().out and not (out / "model").exists()
    halted = json.loads(next((out / "checkpoints").glob("step_*2/statex.json")).read_text())
    assert halted["post_training"]["steps"] == 2 and halted["post_training"]["max_steps"] == 4   # a checkpoint says how far
    assert cli([*args, "--resume"]) == 0
    assert (out / "model" / "config.json").is_file()
    prov = json.loads((out / "model" / "statex.json").read_text())
    assert prov["post_training"]["steps"] == 4 and prov["base_provenance"]["kind"] == "random tiny test model"
    assert len(_losses(out)) == 4


@pytest.mark.parametrize("case", ["missing data file", "unknown data kind", "bad option", "out exists",
                                  "unknown arch", "missing model"])
def test_train_cli_bad_input_is_one_line_exit_2_no_output(case, ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    model, data = str(ckpts["gla"]), "mqar"
    if case == "missing data file":
        data = f"text:{tmp_path / 'nope.txt'}"
    elif case == "unknown data kind":
        data = "csv:/x"
    elif case == "bad option":
        data = "mqar?pairs=many"
    elif case == "out exists":
        out.mkdir()
    elif case == "unknown arch":
        model = str(tmp_path / "llama")
        Path(model).mkdir()
        Path(model, "config.json").write_text(json.dumps({"model_type": "llama"}))
    elif case == "missing model":
        model = str(tmp_path / "nowhere")
    code = cli(["train", "--model", model, "--out", str(out), "--data", data, "--seq-len", "32", "--max-steps", "1",
                "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("statex-train train: error: ") and err.count("\n") == 1, err
    assert (out.exists() and not any(out.iterdir())) if case == "out exists" else not out.exists()


def test_eval_cli_writes_json_markdown_and_plot(ckpts, corpus, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli(["eval", "--model", str(ckpts["mamba2"]), "--out", str(out), "--lengths", "320,400", "--samples", "2",
                "--heldout", f"text:{corpus}?ext=.py", "--ppl-seq-len", "64", "--ppl-tokens", "640",
                "--check-generate", "1", "--label", "tiny"]) == 0
    err = capsys.readouterr().err
    assert "recall: 100%" in err and "12/12" in err           # the progress bar: 3 tasks x 2 lengths x 2 samples
    res = json.loads((out / "eval.json").read_text())
    assert res["trained_on"] == []                            # a random test model: trained on nothing
    assert {(r["task"], r["context"]) for r in res["recall"]} == {(t, n) for t in ("passkey", "niah", "mqar")
                                                                  for n in (320, 400)}
    assert all(r["tokens_mean"] == r["context"] for r in res["recall"])     # the label is the length
    assert all(0 <= r["accuracy"] <= 1 and r["generate_agreement"] == 1.0 for r in res["recall"])
    assert res["heldout"]["tokens"] == 10 * 63 and res["heldout"]["perplexity"] > 1
    assert "| tiny |" in (out / "eval.md").read_text() and (out / "eval.png").stat().st_size > 1000
    assert cli(["eval", "--model", str(ckpts["mamba2"]), "--out", str(tmp_path / "e2"), "--tasks", "sudoku"]) == 2
    assert not (tmp_path / "e2").exists()
    # a length below the passkey template: one line, exit 2, nothing written
    assert cli(["eval", "--model", str(ckpts["mamba2"]), "--out", str(tmp_path / "e3"), "--lengths", "100"]) == 2
    assert "passkey needs at least" in capsys.readouterr().err and not (tmp_path / "e3").exists()


def test_ddp_two_processes_on_cpu(ckpts, tmp_path):
    """torchrun, gloo: two ranks see different data, agree on weights, and export once."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "training.cli", "train", "--model", str(ckpts["gla"]), "--out", str(out), "--data",
           "mqar?min_len=32&max_len=64", "--seq-len", "64", "--batch-size", "2", "--max-steps", "3",
           "--save-every", "3", "--no-progress", "--device", "cpu"]
    # its own process group, so a timeout kills the ranks too, not only torchrun (a hung rank
    # would otherwise outlive the test and hold the port)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:   # it ended between the timeout and the kill
            pass
        _, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 240 s: {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    state = json.loads((out / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    assert state["world"] == 2 and state["tokens"] == 3 * 2 * 64 * 2
    assert state["data"][0] != state["data"][1]
    assert (out / "model" / "model.safetensors").is_file() and len(_losses(out)) == 3


def test_run_and_eval_outputs_are_readable_by_others(ckpts, tmp_path, capsys):
    """Training checkpoints, the exported model and eval results get umask modes
    (0755 dirs, 0644 files under umask 022), not the temp directory's 0700."""
    import stat

    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert cli(["train", "--model", str(ckpts["gla"]), "--out", str(out), "--data", "passkey?min_len=48&max_len=64",
                    "--seq-len", "64", "--batch-size", "1", "--max-steps", "1", "--no-progress"]) == 0
        assert cli(["eval", "--model", str(out), "--out", str(tmp_path / "eval"), "--tasks", "passkey",
                    "--lengths", "300", "--samples", "1", "--check-generate", "0"]) == 0
    finally:
        os.umask(old)
    written = [out / "model", next((out / "checkpoints").iterdir()), tmp_path / "eval"]
    for d in written:
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, (d, oct(d.stat().st_mode))
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, (f, oct(f.stat().st_mode))


def test_init_writes_a_fresh_model_that_the_training_route_takes(ckpts, tmp_path, capsys):
    """`statex-train init`: a named size (with overrides) or a config; the result
    loads, trains and reports its provenance."""
    from model_registry.checkpoint import load_model

    fresh = tmp_path / "fresh"
    assert cli(["init", "--family", "mamba2", "--size", "tiny", "--hidden-size", "64", "--out", str(fresh),
                "--seed", "3"]) == 0
    assert "StateXMamba2ForCausalLM" in capsys.readouterr().out
    model = load_model(fresh)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2 and model.config.vocab_size == 259
    prov = json.loads((fresh / "statex.json").read_text())
    assert prov["kind"] == "random init" and prov["size"] == "tiny" and prov["seed"] == 3
    assert cli(["train", "--model", str(fresh), "--out", str(tmp_path / "run"), "--data", "mqar?min_len=32&max_len=64",
                "--seq-len", "64", "--batch-size", "1", "--max-steps", "1", "--no-progress"]) == 0
    # from a config: the same architecture as the checkpoint it names, fresh weights, its tokenizer
    again = tmp_path / "again"
    assert cli(["init", "--config", str(ckpts["gla"] / "config.json"), "--out", str(again), "--seed", "9"]) == 0
    a, b = load_model(ckpts["gla"]), load_model(again)
    assert a.config.layer_num_heads == b.config.layer_num_heads
    assert all(x.shape == y.shape for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embeddings.weight, b.model.embeddings.weight)
    assert (again / "tokenizer.json").read_text() == (ckpts["gla"] / "tokenizer.json").read_text()
    # a config of another vocabulary with no tokenizer beside it: said, nothing written
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "config.json").write_text(json.dumps({**json.loads((ckpts["gla"] / "config.json").read_text()),
                                                  "vocab_size": 1000}))
    capsys.readouterr()
    assert cli(["init", "--config", str(lone / "config.json"), "--out", str(tmp_path / "bad")]) == 2
    assert "no tokenizer files beside it" in capsys.readouterr().err and not (tmp_path / "bad").exists()
