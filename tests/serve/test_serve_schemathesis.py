"""Property-based tests of the whole HTTP API from its OpenAPI document (schemathesis): no 5xx,
every answer matches the documented schema and content type.

The document is built from the same code as the running server (``create_app`` on a scratch
data dir, nothing started); every generated request goes over HTTP to the real server."""

from __future__ import annotations

import tempfile

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance


def _document() -> dict:
    from malerei.serve.app import create_app
    from malerei.serve.config import Settings

    with tempfile.TemporaryDirectory() as scratch:
        app = create_app(Settings(data_dir=scratch, in_process_worker=False))
        spec = app.openapi()
        app.state.services.db.dispose()
        return spec


schema = schemathesis.openapi.from_dict(_document())


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms(case, fuzz_target):
    server, account = fuzz_target
    case.call_and_validate(base_url=server.url, headers=account.headers,
                           checks=[not_a_server_error, response_schema_conformance, content_type_conformance])
