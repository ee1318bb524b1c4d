"""Bad values from flags, YAML keys and prompts-file lines: one line naming the value and where it came from."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

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
    ({"prompt_ids": [1, 2], "instance": 1}, "instance 1 does not exist"),
])
def test_generate_bad_prompts_file_line_rejected_others_served(record, fragment, megakv_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [3, 4]}) + "\n" + json.dumps(record) + "\n"
                       + json.dumps({"prompt_ids": [5], "max_new_tokens": 2}) + "\n")
    proc = run_generate(megakv_checkpoint("gqa", 1), "--prompts-file", str(prompts), "--json")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"megakv: error: request 1: {prompts}:2: "), proc.stderr
    assert fragment in lines[0], lines[0]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["finish_reason"] for r in records] == ["length", "error", "length"]
    assert records[1]["error"].startswith(f"{prompts}:2: ") and fragment in records[1]["error"]
    assert [r["prompt_ids"] for r in records[::2]] == [[3, 4], [5]] and len(records[2]["token_ids"]) == 2


def test_generate_every_prompts_file_line_bad_status_2(megakv_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1], "top_p": 0}\n{"prompt_ids": [2], "colour": 1}\n')
    proc = run_generate(megakv_checkpoint("gqa", 1), "--prompts-file", str(prompts), "--json")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"megakv: error: request 0: {prompts}:1: top_p must be in (0, 1], got 0",
                     f"megakv: error: request 1: {prompts}:2: unknown key(s) colour"]
    assert [json.loads(line)["finish_reason"] for line in proc.stdout.splitlines()] == ["error", "error"]


@pytest.mark.parametrize("flags,yaml_text,fragment", [
    (["--num-blocks", "100000000000"], None, "--num-blocks 100000000000: the KV pool of 100000000000 blocks"),
    (["--kv-cache-memory-gb", "1e9"], None, "--kv-cache-memory-gb 1000000000.0: the KV pool of"),
    ([], "kv_blocks_per_instance: 100000000000\n", "num_blocks: 100000000000 in "),
])
def test_generate_kv_pool_beyond_memory_one_line(flags, yaml_text, fragment, megakv_checkpoint, tmp_path):
    if yaml_text is not None:
        config = tmp_path / "config.yaml"
        config.write_text(yaml_text)
        flags = ["--config", str(config)]
    proc = run_generate(megakv_checkpoint("gqa", 1), "--prompt-ids", "1,2", *flags)
    assert_one_error_line(proc, fragment, "GiB) on each rank, but ", "GiB) available")


def test_generate_invalid_yaml_one_line_with_place(megakv_checkpoint, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("block_size: 16\ntp: [1, 2\nnum_blocks: 3\n")
    proc = run_generate(megakv_checkpoint("gqa", 1), "--prompt-ids", "1,2", "--config", str(config))
    assert_one_error_line(proc, f"config file {config}:3:11: not valid YAML: expected ',' or ']', but got ':'")


def test_generate_config_gives_model_json_and_prompts_file(megakv_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [3, 4], "max_new_tokens": 2}) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {megakv_checkpoint('gqa', 1)}\njson: true\nprompts_file: {prompts}\n")
    proc = subprocess.run([MEGAKV, "generate", "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["prompt_ids"] for line in proc.stdout.splitlines()] == [[3, 4]]
    # A flag wins over the file: --prompt-ids replaces its prompts_file.
    proc = subprocess.run([MEGAKV, "generate", "--config", str(config), "--prompt-ids", "5", "--max-new-tokens", "1"],
                          capture_output=True, text=True, timeout=120)
    assert [json.loads(line)["prompt_ids"] for line in proc.stdout.splitlines()] == [[5]]


@pytest.mark.parametrize("yaml_text,fragment", [
    ("json: 1\n", "json must be true or false, got 1"),
    ("tp: 1\n", "no checkpoint: pass --model DIR"),
])
def test_generate_config_bad_command_key_one_line(yaml_text, fragment, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text)
    proc = subprocess.run([MEGAKV, "generate", "--config", str(config), "--prompt-ids", "1"], capture_output=True,
                          text=True, timeout=120)
    assert_one_error_line(proc, fragment)
