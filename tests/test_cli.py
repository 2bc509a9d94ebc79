"""The command lines: defaults a user relies on (the served context length),
training run directories taken where a checkpoint is, and bad arguments
answered in one line before the heavy imports (torch, vLLM)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(tmp_path: Path, provenance: dict | None = None, max_position_embeddings: int = 1 << 20) -> Path:
    """A checkpoint directory with just the files the defaults are read from."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "statex_gla",
                                                      "max_position_embeddings": max_position_embeddings}))
    if provenance is not None:
        (tmp_path / "statex.json").write_text(json.dumps(provenance))
    return tmp_path


def test_default_context_is_the_trained_length_else_capped(tmp_path):
    from statex_serve.engine.args import (
        DEFAULT_MAX_MODEL_LEN_CAP,
        EngineArgs,
        default_max_model_len,
    )

    trained = _checkpoint(tmp_path / "trained", {"kind": "statex post-trained checkpoint",
                                                 "post_training": {"seq_len": 3000}})
    assert default_max_model_len(trained)[0] == 3000
    # an expansion of a trained model: the newest training down the chain counts
    expanded = _checkpoint(tmp_path / "expanded", {"kind": "statex expanded checkpoint", "base_provenance": {
        "kind": "statex post-trained checkpoint", "post_training": {"seq_len": 1024}}})
    assert default_max_model_len(expanded)[0] == 1024
    fresh = _checkpoint(tmp_path / "fresh", {"kind": "random init"})
    assert default_max_model_len(fresh)[0] == DEFAULT_MAX_MODEL_LEN_CAP
    short = _checkpoint(tmp_path / "short", None, max_position_embeddings=2048)
    assert default_max_model_len(short)[0] == 2048
    # asked for: anything goes (a recurrent model has no position limit)
    assert EngineArgs(model=str(fresh), max_model_len=1 << 21).with_default_max_model_len().max_model_len == 1 << 21
    assert EngineArgs(model=str(trained)).with_default_max_model_len().max_model_len == 3000


def _run(module: str, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m module args`` with torch, transformers and vLLM shadowed by
    modules that fail on import: a CLI that imports them before it has checked
    its arguments shows a traceback instead of its message."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_BLOCKERS), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)
    return proc, time.perf_counter() - t0


_BLOCKERS = Path(tempfile.mkdtemp(prefix="statex-no-heavy-imports-"))
for _name in ("torch", "transformers", "vllm"):
    (_BLOCKERS / _name).mkdir()
    (_BLOCKERS / _name / "__init__.py").write_text(
        f"raise ImportError('{_name} imported before the arguments were checked')\n")

# Answered before torch is imported (the blockers above prove it); and quickly,
# for a person: an import of torch + transformers takes ~6 s here.
FAST = 5.0


@pytest.mark.parametrize("args,message", [
    (("--max-num-seqs", "0"), "--max-num-seqs must be at least 1"),
    (("--state-memory", "lots"), "--state-memory: cannot read 'lots'"),
    (("--model", "/nonexistent/ckpt"), "--model /nonexistent/ckpt: no such checkpoint directory"),
    (("--max-model-len", "1"), "--max-model-len must be at least 2"),
])
def test_statex_serve_answers_bad_arguments_at_once(args, message):
    proc, took = _run("statex_serve.cli", *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert took < FAST


def test_statex_serve_takes_a_training_run_directory(tmp_path):
    from statex_serve.cli import resolve_model

    run = tmp_path / "run"
    _checkpoint(run / "model")
    assert resolve_model(str(run)) == (str(run / "model"), str(run))
    # a run that has not exported yet: say where its newest checkpoint is
    unfinished = tmp_path / "unfinished"
    _checkpoint(unfinished / "checkpoints" / "step_0000002")
    _checkpoint(unfinished / "checkpoints" / "step_0000004")
    with pytest.raises(SystemExit, match=r"has not exported a model yet .*step_0000004"):
        resolve_model(str(unfinished))
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("args,message", [
    (("eval", "--model", "missing/", "--out", "o", "--tasks", "passkey,foo"),
     "--tasks: 'foo' is not a recall task (one of passkey, niah, mqar)"),
    (("eval", "--model", "missing/", "--out", "o"), "--model missing/: no such directory"),
    (("train", "--model", "missing/", "--out", "o", "--data", "passkey"), "--model missing/: no such directory"),
    (("train", "--model", "missing/", "--out", "o", "--data", "pk"), "--data pk: unknown kind 'pk'"),
    (("train", "--model", "missing/", "--out", "o", "--data", "passkey", "--seq-len", "0"),
     "--seq-len must be at least 1"),
    (("expand", "--base", "missing/", "--out", "o", "--every", "2"), "--base missing/: no such directory"),
    (("import", "--src", "missing/", "--out", "o"), "--src missing/: no such directory"),
    (("init", "--out", "o"), "give --family gla|mamba2 (with --size) or --config FILE"),
    (("init", "--config", "missing.json", "--out", "o"), "--config missing.json: no such file"),
])
def test_statex_train_blames_the_right_argument_at_once(args, message):
    proc, took = _run("training.cli", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"statex-train {args[0]}: error: ") and proc.stderr.count("\n") == 1
    assert took < FAST


def test_statex_train_help_shows_defaults_and_only_real_commands():
    top, _ = _run("training.cli", "--help")
    assert top.returncode == 0, top.stderr
    commands = {"init", "import", "expand", "train", "eval"}
    listed = {line.split()[0] for line in top.stdout.split("positional arguments:")[1].split("options:")[0]
              .splitlines()[2:] if line.startswith("    ") and not line.startswith("     ")}
    assert listed == commands, listed
    assert "export" not in top.stdout.replace("exported", "")
    train, _ = _run("training.cli", "train", "--help")
    entries = {}                                  # "--flag" -> its help text, wrapped lines joined
    for line in train.stdout.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif entries:
            entries[flag] += " " + line.strip()
    for flag, default in (("--seq-len", 2048), ("--batch-size", 8), ("--max-steps", 1000), ("--lr", 0.0003)):
        assert f"(default: {default})" in entries[flag], entries[flag]


def test_image_listens_on_every_interface_whatever_arguments_follow(monkeypatch):
    """`docker run -p 8000:8000 statex-serve --model /model` must not fall back to
    127.0.0.1 inside the container: the image sets STATEX_HOST=0.0.0.0 (read by
    the CLI), the arguments go to the ENTRYPOINT, and no CMD carries --host."""
    from statex_serve.cli import build_parser

    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    env = " ".join(line for line in lines if line.startswith("ENV "))
    assert "STATEX_HOST=0.0.0.0" in env and "STATEX_PORT=8000" in env
    assert 'ENTRYPOINT ["statex-serve"]' in lines
    assert not any(line.startswith("CMD [") and "--host" in line for line in lines)
    monkeypatch.setenv("STATEX_HOST", "0.0.0.0")
    monkeypatch.setenv("STATEX_PORT", "8000")
    args = build_parser().parse_args(["--model", "/model", "--max-num-seqs", "4"])
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert build_parser().parse_args(["--host", "127.0.0.1"]).host == "127.0.0.1"     # --host still wins
    monkeypatch.delenv("STATEX_HOST")
    assert build_parser().parse_args([]).host == "127.0.0.1"                          # outside the image


def test_bench_answers_bad_arguments_at_once():
    proc, took = _run("statex_serve.bench", "memory", "--memory-budget", "lots", "--out", "/nonexistent/o")
    assert proc.returncode == 2 and "cannot read 'lots' as a memory size" in proc.stderr, proc.stderr
    assert took < FAST


def test_prefix_cache_device_tier_defaults_to_a_share_of_free_gpu_memory():
    """On CUDA the device tier grows with the free memory (a 1 GiB tier held 14
    snapshots of a 1.3B GLA, so a burst of unrelated prompts spilled to host);
    elsewhere, and when the user says, the numbers stay as given."""
    from statex_serve.engine.args import EngineArgs

    gib = 1 << 30
    args = EngineArgs(model="m")
    assert args.prefix_cache_budgets("cuda", 100 * gib) == (25 * gib, 4 * gib)
    assert args.prefix_cache_budgets("cuda", 2 * gib) == (1 * gib, 4 * gib)      # never under 1 GiB
    assert args.prefix_cache_budgets("cuda", None) == (1 * gib, 4 * gib)
    assert args.prefix_cache_budgets("cpu", 100 * gib) == (1 * gib, 0)
    given = EngineArgs(model="m", prefix_cache_memory=3 * gib, prefix_cache_host_memory=0)
    assert given.prefix_cache_budgets("cuda", 100 * gib) == (3 * gib, 0)
    assert EngineArgs(model="m", prefix_cache_memory=0).prefix_cache_budgets("cuda", 100 * gib)[0] == 0
