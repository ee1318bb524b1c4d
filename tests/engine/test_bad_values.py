"""Bad values from flags, YAML keys and prompts-file lines: one line naming the value and where it came from."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MEGAKV = str(Path(sys.executable).with_name("megakv"))


def run_generate(checkpoint: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MEGAKV, "generate", "--model", str(checkpoint), *args], capture_output=True, text=True,
                          timeout=120)


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megakv: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("flags,fragments", [
    (["--temperature", "nan"], ["temperature must be a finite number, got nan"]),
    (["--top-p", "inf"], ["top_p must be a finite number, got inf"]),
    (["--seed", "99999999999999999999"], ["seed must be an integer from 0 to 2**63 - 1", "99999999999999999999"]),
    (["--kv-cache-memory-gb", "inf"], ["kv_cache_memory_gb must be a positive finite number, got inf"]),
])
def test_generate_bad_flag_value_one_line(flags, fragments, megakv_checkpoint):
    assert_one_error_line(run_generate(megakv_checkpoint("gqa", 1), "--prompt-ids", "1,2", *flags), *fragments)


@pytest.mark.parametrize("yaml_text,fragments", [
    ('kv_cache_memory_gb: "1"\n', ["kv_cache_memory_gb must be a positive finite number, got '1'"]),
    ("tp: true\n", ["tensor_parallel_size must be a positive integer, got True"]),
    ("instances: true\n", ["num_instances must be a positive integer, got True"]),
    ("num_blocks: true\n", ["num_blocks must be a positive integer, got True"]),
    ("lending_cap: true\n", ["lending_cap must be between 0 and 1, got True"]),
    ("max_num_seqs: true\n", ["max_num_seqs must be a positive integer, got True"]),
])
def test_generate_bad_yaml_value_one_line(yaml_text, fragments, megakv_checkpoint, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text)
    assert_one_error_line(run_generate(megakv_checkpoint("gqa", 1), "--prompt-ids", "1,2", "--config", str(config)),
                          *fragments)


@pytest.mark.parametrize("record,fragment", [
    ({"prompt_ids": [1, 2], "max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
    ({"prompt_ids": [1, 2], "temperature": -1}, "temperature must be >= 0, got -1"),
    ({"prompt_ids": [1, 2], "top_p": 0}, "top_p must be in (0, 1], got 0"),
    ({"prompt_ids": [1, 2], "seed": "a"}, "seed must be an integer"),
    ({"prompt_ids": [1, 2], "temperature": float("nan")}, "temperature must be a finite number, got nan"),
    ({"prompt_ids": [True, 6]}, "prompt_ids must be a list of integers, got [True, 6]"),
    ({"prompt_ids": [1, 2], "instance": True}, "instance must be an integer >= 0, got True"),
])
def test_generate_bad_prompts_file_value_names_file_and_line(record, fragment, megakv_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [3, 4]}) + "\n" + json.dumps(record) + "\n")
    assert_one_error_line(run_generate(megakv_checkpoint("gqa", 1), "--prompts-file", str(prompts)),
                          f"{prompts}:2: ", fragment)
