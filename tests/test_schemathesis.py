"""Schemathesis over the live server's OpenAPI schema: generated
requests, valid and invalid, against every documented operation. No 5xx, every
status and body as the schema documents it, every answer within a time bound.
A bounded number of examples with a fixed seed (derandomized), so the run is
the same every time and short."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from model_registry.testing import make_tiny_checkpoint
from statex_serve.testing import ServerProcess

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

KEY = "schemathesis-key"
EXAMPLES_PER_OPERATION = 80          # per mode (valid, invalid); 12 operations: over 1000 cases
TIME_BOUND_S = 10.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("st") / "gla", "gla", seed=1)
    # a short context and a small default so generated requests stay cheap
    with ServerProcess(ckpt, "--api-key", KEY, "--max-model-len", "256", "--default-max-tokens", "8",
                       "--max-num-seqs", "16", "--max-request-body", "1MiB", env={"OMP_NUM_THREADS": "1"}) as s:
        yield s


@pytest.mark.slow
def test_the_api_keeps_its_schema(server):
    """Every documented operation, EXAMPLES_PER_OPERATION generated cases each
    (schemathesis' positive and negative modes)."""
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    headers = {"Authorization": f"Bearer {KEY}"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    calls = 0
    for op, mode in [(op, mode) for op in operations for mode in GenerationMode]:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            nonlocal calls
            calls += 1
            response = case.call(base_url=server.base_url, headers=headers, timeout=TIME_BOUND_S)
            case.validate_response(response, checks=checks)
        try:
            check()
        except Unsatisfiable:     # an operation with no input has no invalid one
            assert mode is GenerationMode.NEGATIVE, op.label
    assert calls >= 1000, calls
