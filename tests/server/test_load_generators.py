"""Third-party load generators drive megakv serve unchanged: GuideLLM and AIPerf, pinned in their own environment
(launch/setup_clients.sh), stream a few requests each over /v1/completions and /v1/chat/completions, offline, and
report every one successful; afterwards every block is free."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from megakv.bench.server_metrics import total

from server_process import ROOT, wait_for_idle_pools

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

CLIENTS = ROOT / os.environ.get("MEGAKV_CLIENTS_VENV", ".venv-clients") / "bin"
NUM_REQUESTS, PROMPT_TOKENS, OUTPUT_TOKENS = 6, 24, 8
# The Hugging Face repository name the chat model's tokenizer has in the offline cache given to AIPerf.
TOKENIZER_REPO = "megakv/tiny"
# Any 40 hex digits name the cached snapshot.
SNAPSHOT = "0" * 40
RUN_SECONDS = 300


def tool(name: str) -> str:
    path = CLIENTS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run bash launch/setup_clients.sh")
    return str(path)


@pytest.fixture(scope="module")
def hf_home(chat_model, tmp_path_factory) -> Path:
    """A Hugging Face home whose cache holds the chat model's tokenizer as TOKENIZER_REPO: offline, AIPerf loads
    tokenizers from the cache only, by repository name."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / f"models--{TOKENIZER_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(chat_model[0] / name, snapshot / name)
    return home


def run_tool(argv: list[str], hf_home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_COLOR="1")
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_SECONDS)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def assert_served_cleanly(server) -> None:
    assert "Traceback" not in server.output
    samples = wait_for_idle_pools(server.url)
    assert total(samples, "megakv:kv_blocks_free") == total(samples, "megakv:kv_blocks_total")


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_guidellm_streams_every_request_successfully(server, chat_model, hf_home, tmp_path, route):
    report = tmp_path / "benchmarks.json"
    run_tool([tool("guidellm"), "run", "--backend", f"kind=openai_http,target={server.url},model=tiny,"
              f"request_format={route}", "--profile", "kind=concurrent,streams=2", "--constraint",
              f"kind=max_requests,count={NUM_REQUESTS}", "--tokenizer", f"kind=huggingface_auto,model={chat_model[0]}",
              "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
              "--output", f"kind=json,path={report}", "--disable-console"], hf_home, tmp_path)
    [benchmark] = json.loads(report.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    assert totals == {"successful": NUM_REQUESTS, "errored": 0, "incomplete": 0, "total": NUM_REQUESTS}
    assert_served_cleanly(server)


@pytest.mark.parametrize("endpoint_type", ["completions", "chat"])
def test_aiperf_streams_every_request_successfully(server, hf_home, tmp_path, endpoint_type):
    artifacts = tmp_path / "artifacts"
    # min_tokens and ignore_eos make each answer exactly OUTPUT_TOKENS long, as AIPerf's own hint for vLLM says.
    run_tool([tool("aiperf"), "profile", "--model", "tiny", "--url", server.url, "--endpoint-type", endpoint_type,
              "--streaming", "--request-count", str(NUM_REQUESTS), "--concurrency", "2", "--tokenizer",
              TOKENIZER_REPO, "--synthetic-input-tokens-mean", str(PROMPT_TOKENS), "--output-tokens-mean",
              str(OUTPUT_TOKENS), "--extra-inputs", f"min_tokens:{OUTPUT_TOKENS}", "--extra-inputs",
              "ignore_eos:true", "--use-server-token-count", "--artifact-dir", str(artifacts), "--ui-type", "none"],
             hf_home, tmp_path)
    export = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    assert export["request_count"]["avg"] == NUM_REQUESTS
    assert export["error_summary"] == [] and not export["was_cancelled"]
    assert export["output_sequence_length"]["avg"] == OUTPUT_TOKENS
    assert_served_cleanly(server)
