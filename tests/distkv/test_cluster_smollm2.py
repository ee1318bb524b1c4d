"""The real model on a DistKV cluster: a pass-key question longer than one instance's pool is answered as HF does."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from settled import assert_settled

MEGAKV = str(Path(sys.executable).with_name("megakv"))
BLOCK_SIZE = 16
POOL_BLOCKS = 30
MAX_NEW_TOKENS = 24


@pytest.mark.mpi
@pytest.mark.slow
def test_cluster_smollm2_pass_key_beyond_one_pool_equals_transformers(smollm2, run_mpi, tmp_path):
    pass_key, france = smollm2.pass_key_messages(), [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2.chat_ids(pass_key)
    num_blocks = -(-(len(prompt) + MAX_NEW_TOKENS) // BLOCK_SIZE)
    assert 2 * POOL_BLOCKS <= num_blocks <= 3 * POOL_BLOCKS
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"messages": pass_key, "instance": 0}) + "\n"
                            + json.dumps({"messages": france, "instance": 1}) + "\n")
    proc = run_mpi(3, [MEGAKV, "generate", "--model", str(smollm2.checkpoint(1)), "--instances", "3",
                       "--block-size", str(BLOCK_SIZE), "--kv-blocks-per-instance", str(POOL_BLOCKS),
                       "--max-num-batched-tokens", "128", "--max-new-tokens", str(MAX_NEW_TOKENS),
                       "--prompts-file", str(prompts_file), "--json"], timeout=600)
    *records, report = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records[0]["prompt_ids"] == prompt
    assert records[0]["token_ids"] == smollm2.greedy(prompt, MAX_NEW_TOKENS)
    assert smollm2.pass_key in records[0]["text"]
    assert records[0]["num_local_blocks"] == POOL_BLOCKS and records[0]["block_instances"] == [0, 1, 2]
    assert "Paris" in records[1]["text"]
    assert_settled(report["cluster"])
