"""Property-based fuzzing of the server from its own OpenAPI schema (Schemathesis), against uvicorn on loopback.

Every generated request must get a response that is not a 5xx and that conforms to the schema the app
declares (status code, content type, body, headers). Bounded: a few examples per operation, tiny
generations (`max_tokens` is capped before sending), well under a minute on the tiny model.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

MAX_GEN_TOKENS = 4
MAX_EXAMPLES = 15
# Checked: not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
# response_headers_conformance. Left out: the two checks about which *requests* the server accepts. The
# schema is deliberately lenient (unknown fields are ignored, as OpenAI clients add new ones), and some
# schema-valid requests are rightly refused by semantics the schema cannot say (a non-text content part, a
# prompt over the context, an unknown model): those are documented 400/404s, which the checks above cover.
EXCLUDED = [negative_data_rejection, positive_data_acceptance]


def _cap_tokens(body) -> None:
    """Generated bodies may ask for millions of tokens; the contract under test does not depend on length."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > MAX_GEN_TOKENS:
                body[key] = MAX_GEN_TOKENS
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = MAX_GEN_TOKENS


@pytest.mark.timeout(180)
def test_api_conforms_to_its_schema(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: dict[str, set[int]] = {}
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            _cap_tokens(case.body)
            response = case.call_and_validate(base_url=server.url, excluded_checks=EXCLUDED)
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

        check()
    # the generated requests reached the handlers, not only the validation layer
    assert 200 in statuses["POST /v1/chat/completions"] | statuses["POST /v1/completions"], statuses
