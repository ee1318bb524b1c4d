"""The served OpenAPI schema describes the real API: schemathesis, driven by it alone, finds no 5xx and no response
that strays from it, on a one-process server whose limits keep every generated request short."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from megakv.bench.server_metrics import total

from server_process import spawn_server, wait_for_idle_pools

NUM_BLOCKS = 16
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
# positive_data_acceptance is left out: the schema cannot state the cross-field rules the server enforces
# ("top_logprobs needs logprobs", "exactly one of prompt and messages", a field only at its neutral value), so a
# body that matches it may still be a 400. Every other check of schemathesis runs.
EXCLUDED_CHECKS = "positive_data_acceptance"


@pytest.fixture(scope="module")
def server(chat_model):
    server = spawn_server(chat_model[1], "--num-blocks", str(NUM_BLOCKS), "--served-model-name", "tiny",
                          "--max-request-tokens", "2048", "--max-choices-per-request", "16")
    yield server
    server.kill()


def test_served_schema_describes_every_route_body(server):
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    for route in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        operation = schema["paths"][route]["post"]
        assert "$ref" in operation["requestBody"]["content"]["application/json"]["schema"]
        assert {"200", "400", "413"} <= set(operation["responses"])
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert fields["model"]["anyOf"] == [{"type": "string", "enum": ["tiny"]}, {"type": "null"}]
    # As vLLM reads them, null is the default of every field, and the schema says so.
    assert {"type": "null"} in fields["n"]["anyOf"] and fields["n"]["default"] == 1


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_nonconforming_response(server, tmp_path):
    proc = subprocess.run([SCHEMATHESIS, "run", f"{server.url}/openapi.json", "--checks", "all", "--exclude-checks",
                           EXCLUDED_CHECKS, "--max-examples", "60", "--seed", "1", "--request-timeout", "120",
                           "--report", "junit", "--report-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Traceback" not in server.output
    assert total(wait_for_idle_pools(server.url), "megakv:kv_blocks_free") == NUM_BLOCKS
