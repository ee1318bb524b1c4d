"""The deepspeed launcher runs megakv at TP=2 with the same tokens as one process, and a DistKV cluster (whose
control messages then go over megakv's own sockets, not MPI) with Hugging Face's tokens."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from settled import assert_settled

BIN_DIR = Path(sys.executable).parent


@pytest.mark.slow
@pytest.mark.mpi
def test_deepspeed_launcher_tp2_equals_single_process(megakv_checkpoint, run_deepspeed):
    args = ["--prompt-ids", "5,17,42,7,99", "--max-new-tokens", "12", "--json"]
    single = subprocess.run([str(BIN_DIR / "megakv"), "generate", "--model", str(megakv_checkpoint("gqa", 1)),
                             *args], capture_output=True, text=True, check=True, timeout=120)
    launched = run_deepspeed(2, "generate.py", ["--model", str(megakv_checkpoint("gqa", 2)), "--tp", "2", *args])
    # --json: stdout holds nothing but the JSON records.
    assert [json.loads(line) for line in launched.stdout.splitlines()] == [json.loads(single.stdout)]


@pytest.mark.slow
@pytest.mark.mpi
def test_deepspeed_launcher_runs_a_distkv_cluster_whose_long_prompt_borrows(megakv_checkpoint, hf_llama, hf_greedy,
                                                                           run_deepspeed, tmp_path):
    # 2 instances x TP 2, pools of 8 blocks of 16 tokens: the 200-token prompt needs blocks of the other instance.
    prompts = [[(7 * index) % 301 for index in range(200)], [5, 17, 42]]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt_ids": prompt}) + "\n" for prompt in prompts))
    launched = run_deepspeed(4, "generate.py", [
        "--model", str(megakv_checkpoint("gqa", 2)), "--tp", "2", "--instances", "2", "--num-blocks", "8",
        "--block-size", "16", "--max-num-batched-tokens", "64", "--prompts-file", str(prompts_file),
        "--max-new-tokens", "10", "--json"])
    *outputs, report = [json.loads(line) for line in launched.stdout.splitlines()]
    assert [output["token_ids"] for output in outputs] == hf_greedy(hf_llama("gqa"), prompts, 10)
    assert outputs[0]["num_remote_blocks"] > 0 and outputs[0]["block_instances"] == [0, 1]
    assert_settled(report["cluster"])
