"""Models that ship inside the package, so `statex-serve` serves something
useful with no download. Each lives in a sub-directory in our checkpoint format
(config.json, model.safetensors, tokenizer files, statex.json) next to the
command that reproduces it (see its statex.json and docs/bundled-model.md)."""
from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent
DEFAULT_MODEL = "statex-mamba2-tiny"


def available() -> list[str]:
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())


def model_path(name: str) -> Path:
    path = BUNDLED_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no bundled model named {name!r} (bundled: {', '.join(available()) or 'none'})")
    return path


def default_model_path() -> Path:
    return model_path(DEFAULT_MODEL)
