"""What the API test modules (test_api, test_hostile_clients,
test_vllm_compatible_api) share: the greedy oracle beside a module's
checkpoint, and starting a module's servers together. Import a fixture by name
into the module that uses it."""
from __future__ import annotations

import contextlib

import pytest
import torch

from model_registry.checkpoint import load_model
from statex_serve.testing import ServerProcess, start_all


@pytest.fixture(scope="module")
def oracle(ckpt):
    """The module's checkpoint (its ``ckpt`` fixture) loaded in-process: the expected greedy tokens."""
    torch.set_num_threads(1)
    return load_model(ckpt)


def server_fixture(name: str):
    """A module fixture named ``name``: that server of the module's ``servers`` fixture."""
    @pytest.fixture(scope="module", name=name)
    def server(servers):
        return servers[name]
    return server


@contextlib.contextmanager
def running(**servers: ServerProcess):
    """Start the servers together (they load in parallel); yields {name: server} and stops them all at the end."""
    start_all(list(servers.values()))
    try:
        yield servers
    finally:
        for s in servers.values():
            s.__exit__(None, None, None)
