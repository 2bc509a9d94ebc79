"""Our checkpoint format: a directory with config.json, model.safetensors,
tokenizer files and statex.json (provenance). Writes are atomic: everything goes
to a temporary sibling directory that is renamed into place at the end, so a
failure never leaves a half-written checkpoint. What lands there gets the modes
the umask gives (not the temporary directory's owner-only 0700), so a checkpoint
mounted into a container that runs as another user stays readable.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model_registry.configs import ConfigError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or converted; the message names the file or tensor."""


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask
    both sets and returns, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_modes(root: str | Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open``
    would have: 0777 & ~umask for directories, 0666 & ~umask for files.
    ``tempfile.mkdtemp`` makes owner-only directories, and some writers (e.g.
    temp-file-then-rename ones) leave 0600 files."""
    mask = current_umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False):
    """Yield a temporary directory next to ``out_dir``; on success it replaces
    ``out_dir``, on failure it is removed and ``out_dir`` is untouched."""
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        apply_umask_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; ``CheckpointError`` naming the file otherwise."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_config_dict(src: str | Path) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{src}: no config.json (expected a checkpoint directory)")
    return read_json(path)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or (``*.bin``) a pickle of tensors only
    (``weights_only``); ``CheckpointError`` naming the file when it is
    truncated, corrupt or holds anything else."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:    # safetensors, pickle and zip errors have no common base
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: cannot read its tensors (truncated or corrupt?): {first}") from None


def load_state_dict(src: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint dir: model.safetensors (or sharded
    model-*.safetensors / *.safetensors), else pytorch_model*.bin. A training
    step directory's optimizer.safetensors is not the model's."""
    src = Path(src)
    files = ([src / "model.safetensors"] if (src / "model.safetensors").is_file()
             else sorted(f for f in src.glob("*.safetensors") if f.name != "optimizer.safetensors"))
    if not files:
        files = sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{src}: no weights (model.safetensors or pytorch_model.bin)")
    sd = {}
    for f in files:
        tensors = read_tensors(f)
        if not isinstance(tensors, dict) or not all(torch.is_tensor(t) for t in tensors.values()):
            raise CheckpointError(f"{f}: not a dictionary of tensors")
        sd.update(tensors)
    return sd


def check_and_load(model: torch.nn.Module, sd: dict[str, torch.Tensor], src: str | Path = "checkpoint",
                   allow_missing: tuple[str, ...] = ()) -> None:
    """Load ``sd`` into ``model`` strictly, with errors that name tensors and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and k not in allow_missing]
    if missing:
        raise CheckpointError(f"{src}: missing tensor {missing[0]} (shape {tuple(expected[missing[0]].shape)})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise CheckpointError(f"{src}: unexpected tensor {unexpected[0]} (shape {tuple(sd[unexpected[0]].shape)}); "
                              "the config does not describe these weights")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{src}: tensor {k} has shape {tuple(t.shape)}, "
                                  f"the config expects {tuple(expected[k].shape)}")
        if expected[k].is_floating_point():
            # an integer tensor would be cast silently, and a NaN model serves garbage
            if not t.is_floating_point():
                raise CheckpointError(f"{src}: tensor {k} is {str(t.dtype).removeprefix('torch.')}; weights must "
                                      "be floating point")
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{src}: tensor {k} holds NaN or infinite values")
    model.load_state_dict(sd, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def save_checkpoint(model, out_dir: str | Path, tokenizer_src: str | Path | None = None,
                    provenance: dict | None = None, overwrite: bool = False) -> Path:
    """Export in our format (atomically). ``provenance`` goes to statex.json."""
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_model_files(model, tmp, tokenizer_src, provenance)
    return Path(out_dir)


def write_model_files(model, out: Path, tokenizer_src: str | Path | None = None,
                      provenance: dict | None = None) -> None:
    """config.json, model.safetensors (tied lm_head left out), tokenizer files,
    statex.json into an existing directory (callers make the write atomic)."""
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_src is not None:
        copy_tokenizer_files(tokenizer_src, out)
    (out / "statex.json").write_text(json.dumps(provenance or {}, indent=2, default=str))


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, Path(dst) / name)
            copied.append(name)
    return copied


def load_model(src: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load one of our checkpoints (model_type statex_gla / statex_mamba2)."""
    from model_registry import MODEL_TYPES

    cfg = read_config_dict(src)
    mt = cfg.get("model_type")
    if mt not in MODEL_TYPES:
        raise ConfigError(f"{src}: model_type {mt!r} is not one of ours ({', '.join(MODEL_TYPES)}); "
                          "convert upstream checkpoints with `statex-train import --src DIR --out DIR`")
    config_cls, model_cls = MODEL_TYPES[mt]
    config = config_cls.from_dict(cfg)
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to_empty(device="cpu")
    sd = load_state_dict(src)
    check_and_load(model, sd, src, allow_missing=("lm_head.weight",) if config.tie_word_embeddings else ())
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()
