"""Resumable training checkpoints: one directory per step, written atomically.

``checkpoints/step_000100/`` holds a loadable model checkpoint (config.json,
model.safetensors, tokenizer files, statex.json), ``optimizer.safetensors``
(+ ``optimizer.json`` for the non-tensor fields) and ``trainer_state.json``
(step, tokens, the planned number of steps, every rank's data cursor and RNG
states). No pickle: everything is safetensors or JSON. The learning-rate
schedule is a pure function of the step, so the step is its whole state.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from model_registry.checkpoint import (CheckpointError, atomic_output_dir, check_and_load, read_json, read_tensors,
                                      write_model_files)

STEP_PREFIX = "step_"


def step_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"{STEP_PREFIX}{step:07d}"


def latest_checkpoint(out: Path) -> Path | None:
    done = checkpoints(out)
    return done[-1] if done else None


def checkpoints(out: Path) -> list[Path]:
    """Complete step directories, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / "trainer_state.json").is_file())


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Step directories a killed save left half written (``.step_*.tmp-*``, and
    ``.step_*.old-*`` from a replace): nothing reads them, so they only cost disk."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith("." + STEP_PREFIX) and (".tmp-" in p.name or ".old-" in p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    st = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state().tolist()
    return st


def set_rng_state(st: dict) -> None:
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(st["cuda"], dtype=torch.uint8))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, other = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                other[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "other_state": other}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["other_state"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_checkpoint(out: Path, step: int, model, opt, trainer_state: dict, tokenizer_src: Path,
                          provenance: dict, keep: int = 2) -> Path:
    path = step_dir(out, step)
    with atomic_output_dir(path, overwrite=True) as tmp:
        write_model_files(model, tmp, tokenizer_src, provenance)
        tensors, meta = _optimizer_tensors(opt)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    # keep the newest `keep` checkpoints; older ones only cost disk
    root = path.parent
    old = sorted(p for p in root.iterdir() if p.name.startswith(STEP_PREFIX))[:-keep] if keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return path


def load_train_checkpoint(path: Path, model, opt) -> dict:
    """Weights into ``model`` (same device), optimizer state into ``opt``; returns trainer_state."""
    path = Path(path)
    sd = read_tensors(path / "model.safetensors")
    tied = getattr(model.config, "tie_word_embeddings", False)
    device = next(model.parameters()).device
    check_and_load(model, {k: v.to(device) for k, v in sd.items()}, path / "model.safetensors",
                   allow_missing=("lm_head.weight",) if tied else ())
    state = read_json(path / "trainer_state.json")
    missing = [k for k in ("step", "tokens", "max_steps", "world", "data", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"{path / 'trainer_state.json'}: no {missing[0]!r} (not a trainer state)")
    try:
        opt.load_state_dict(_optimizer_state(read_tensors(path / "optimizer.safetensors"),
                                             read_json(path / "optimizer.json")))
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'optimizer.safetensors'}: does not fit this model's optimizer ({e})") from None
    return state
