"""The bundled model: shipped in the package, trained with our own tools, and
served by `statex-serve` when no --model is given. (It does not yet retrieve
a passkey: docs/bundled-model.md.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from statex_serve import bundled
from statex_serve.cli import resolve_model
from statex_serve.testing import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_model_is_the_default_and_a_real_statex_checkpoint():
    path, name = resolve_model(None)
    assert Path(path) == bundled.default_model_path() and name == bundled.DEFAULT_MODEL
    config = json.loads((Path(path) / "config.json").read_text())
    assert config["model_type"] == "statex_gla"
    assert len(set(config["layer_num_heads"])) > 1           # expanded and unexpanded layers
    provenance = json.loads((Path(path) / "statex.json").read_text())
    assert provenance["kind"] == "statex post-trained checkpoint" and provenance["post_training"]["steps"] > 0
    assert provenance["base_provenance"]["expansion"]["layers"]
    assert (Path(path) / "model.safetensors").stat().st_size < 8 * 2**20   # a few MB, as promised


@pytest.fixture(scope="module")
def server():
    with ServerProcess(bundled.DEFAULT_MODEL, env={"OMP_NUM_THREADS": "1"}) as srv:
        yield srv


def test_bundled_model_writes_text(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    text = client.completions.create(model=bundled.DEFAULT_MODEL, prompt="The function returns",
                                     max_tokens=64, temperature=0).choices[0].text
    words = text.split()
    assert len(words) >= 6
    # mostly real lowercase words, not byte soup
    alpha = sum(w.strip(".,;:()'\"").isalpha() for w in words) / len(words)
    assert alpha > 0.6, text


def test_check_script_agrees(server):
    res = subprocess.run([sys.executable, str(ROOT / "scripts/check_served_model.py"), "--base-url",
                          server.base_url], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
