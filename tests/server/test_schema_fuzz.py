"""Schemathesis over the server's own OpenAPI schema: valid and invalid requests to every
operation, and none may get a 5xx. Bounded by example count for CI; raise
SPARSA_FUZZ_EXAMPLES for a longer run."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from tests.server.conftest import API_KEY

EXAMPLES = int(os.environ.get("SPARSA_FUZZ_EXAMPLES", "30"))


@pytest.fixture(scope="session")
def api_schema(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    schema.config.generation.update(
        modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
        max_examples=EXAMPLES)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _no_flush_denormal():
    # Every LLMEngine built on this thread (other test modules build some) flushes
    # denormals, and hypothesis refuses to generate floats with that set.
    import torch

    torch.set_flush_denormal(False)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, server):
    response = case.call(base_url=server.url, timeout=60,
                         headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code < 500, (
        f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}\n"
        f"body: {str(case.body)[:500]}")
    if response.status_code >= 400:
        # every error is in the OpenAI format
        assert "error" in response.json(), response.text[:300]


def test_engine_unharmed_after_fuzzing(server, client):
    server.wait_idle()
    assert server.all_blocks_free()
    r = client.completions.create(model="tiny-llama", prompt="still alive", max_tokens=3)
    assert r.usage.completion_tokens >= 1


@pytest.fixture(scope="session")
def positive_schema(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE],
                                    max_examples=EXAMPLES)
    return schema


positive = schemathesis.pytest.from_fixture("positive_schema")


@positive.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_positive_data_conforms(case, server):
    """Schema-valid requests: every answer is documented (status, content type, headers)
    and matches its declared schema, and none is a 5xx. Acceptance of every schema-valid
    body is not asked: limits that depend on the served model (context length, the
    model's name, its vocabulary, the scheduling policy) answer a documented 400."""
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    case.call_and_validate(base_url=server.url, timeout=60,
                           headers={"Authorization": f"Bearer {API_KEY}"},
                           excluded_checks=[positive_data_acceptance])
