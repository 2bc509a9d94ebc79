"""Shared test setup: GPU tests run only where CUDA is present (the device machine);
in-process engine tests run torch on one thread; a toy corpus for the capacity experiment."""
from __future__ import annotations

import json
import random

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are latency-bound: one intra-op thread is many times faster
    than two on a 2-core machine that is busy with anything else. Modules that
    run an engine in-process use it with ``pytest.mark.usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_WORDS = "the a river old mill town train boat lake market rain park library map snow hill baker clock".split()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """A toy text corpus (JSONL) for the capacity experiment's pipeline and the bench's capacity tasks."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with path.open("w") as f:
        for _ in range(700):
            f.write(json.dumps({"text": " ".join(rng.choice(_WORDS) for _ in range(60)) + "."}) + "\n")
    return path
