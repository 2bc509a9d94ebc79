"""The bundled models: shipped in the package, trained with our own tools; the
default one is served by `statex-serve` when no --model is given and retrieves
a passkey from a >= 1K-token prompt through the API (docs/bundled-model.md)."""
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


def test_the_default_is_a_bundled_model():
    path, name = resolve_model(None)
    assert Path(path) == bundled.default_model_path() and name == bundled.DEFAULT_MODEL
    assert bundled.DEFAULT_MODEL in bundled.available()


@pytest.mark.parametrize("name", bundled.available())
def test_bundled_models_are_real_statex_checkpoints(name):
    path = bundled.model_path(name)
    config = json.loads((path / "config.json").read_text())
    per_layer = config["layer_num_heads"] if config["model_type"] == "statex_gla" else config["layer_state_size"]
    assert len(set(per_layer)) > 1                           # expanded and unexpanded layers
    provenance = json.loads((path / "statex.json").read_text())
    assert provenance["kind"] == "statex post-trained checkpoint" and provenance["post_training"]["steps"] > 0
    chain = [provenance]                                     # every stage, newest first, back to the init
    while "base_provenance" in chain[-1]:
        chain.append(chain[-1]["base_provenance"])
    expansions = [p["expansion"] for p in chain if "expansion" in p]
    assert len(expansions) == 1 and expansions[0]["layers"]  # expanded once, then post-trained
    assert chain.index(next(p for p in chain if "expansion" in p)) > 0
    assert chain[-1]["kind"] == "random init"                # trained from scratch with our tools
    assert (path / "model.safetensors").stat().st_size < 8 * 2**20   # a few MB, as promised
    evaluation = json.loads((path / "eval.json").read_text())
    assert evaluation                                        # the numbers docs/bundled-model.md quotes


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


def test_default_model_answers_passkeys_through_the_api(server):
    """The acceptance check of docs/bundled-model.md, as the Docker smoke test runs it: passkeys
    hidden at three depths of ~1.1K-token prompts, answered exactly."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts/check_served_model.py"), "--base-url",
                          server.base_url, "--passkey", "--length", "1100", "--seeds", "1,2,3"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(": ok") == 3, res.stdout


def test_models_advertises_the_trained_context_not_a_million_tokens(server):
    """Without --max-model-len the server offers the length the model was trained
    at (statex.json), not the config's 2^20 that a recurrent model carries."""
    from openai import OpenAI

    provenance = json.loads((bundled.default_model_path() / "statex.json").read_text())
    trained = provenance["post_training"]["seq_len"]
    (model,) = OpenAI(base_url=server.base_url + "/v1", api_key="unused").models.list().data
    assert model.model_extra["max_model_len"] == trained < 1 << 20
    too_long = "x" * trained
    import httpx

    r = httpx.post(server.base_url + "/v1/completions", json={"model": bundled.DEFAULT_MODEL, "prompt": too_long,
                                                               "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and "maximum context length is %d" % trained in r.text
