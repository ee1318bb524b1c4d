"""Bad requests, flags and checkpoints: one clear error line, a non-zero exit, no traceback."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

MEGAKV = str(Path(sys.executable).with_name("megakv"))


def run_megakv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MEGAKV, "generate", *args], capture_output=True, text=True, timeout=120)


def assert_clean_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, proc.stderr
    assert fragment in error_lines[0], error_lines[0]


@pytest.mark.parametrize("args,fragment", [
    (["--prompt-ids", "1,2,999"], "outside the vocabulary"),
    (["--prompt-ids", ""], "empty prompt"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "2000"], "maximum position"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "300", "--num-blocks", "8"],
     "prompt (2 tokens) + max_new_tokens (300) = 302 exceeds the 128 tokens a request may hold (the KV memory it "
     "may use: 8 blocks of 16 tokens, its instance's pool)"),
    (["--prompt-ids", "1,2", "--dtype", "float8"], "unknown dtype"),
    (["--prompt-ids", "1,2", "--tp", "3"], "does not divide num_attention_heads"),
    (["--prompt-ids", "1,2", "--tp", "2"], "sharded for tp=1"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--prompt-ids", "1,2", "--top-p", "0"], "top_p"),
    (["--prompt", "hello"], "has no tokenizer.json"),
    (["--chat", "hello"], "has no tokenizer.json"),
])
def test_generate_bad_request_clear_error(args, fragment, megakv_checkpoint):
    assert_clean_error(run_megakv("--model", str(megakv_checkpoint("gqa", 1)), *args), fragment)


def test_generate_missing_checkpoint_clear_error(tmp_path):
    assert_clean_error(run_megakv("--model", str(tmp_path / "nope"), "--prompt-ids", "1"), "nope")


def test_generate_corrupt_checkpoint_clear_error(megakv_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(megakv_checkpoint("gqa", 1), broken)
    shard = broken / "model_tp00.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert_clean_error(run_megakv("--model", str(broken), "--prompt-ids", "1"), "corrupt")


def test_generate_bad_prompts_file_clear_error(megakv_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2]}\n{"prompt_ids": [1], "colour": 3}\n')
    assert_clean_error(run_megakv("--model", str(megakv_checkpoint("gqa", 1)), "--prompts-file", str(prompts)),
                       "prompts.jsonl:2: unknown key(s) colour")


def test_generate_bad_messages_in_prompts_file_clear_error(megakv_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1]}\n{"messages": [{"role": "user"}]}\n')
    assert_clean_error(run_megakv("--model", str(megakv_checkpoint("gqa", 1)), "--prompts-file", str(prompts)),
                       "prompts.jsonl:2: message 0 must be an object with string \"role\" and \"content\"")
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}\n')
    assert_clean_error(run_megakv("--model", str(megakv_checkpoint("gqa", 1)), "--prompts-file", str(prompts)),
                       "exactly one of prompt_ids, prompt, messages")


def test_generate_chat_without_template_clear_error(megakv_checkpoint, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(megakv_checkpoint("gqa", 1), checkpoint)
    Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>")).save(str(checkpoint / "tokenizer.json"))
    assert_clean_error(run_megakv("--model", str(checkpoint), "--chat", "hi"), "has no chat template")


def test_generate_bad_values_in_files_clear_error(megakv_checkpoint, tmp_path):
    checkpoint = megakv_checkpoint("gqa", 1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2], "temperature": "hot"}\n')
    assert_clean_error(run_megakv("--model", str(checkpoint), "--prompts-file", str(prompts)),
                       "prompts.jsonl:1: temperature must be a finite number, got 'hot'")
    config = tmp_path / "eos.yaml"
    config.write_text("ignore_eos: maybe\n")
    assert_clean_error(run_megakv("--model", str(checkpoint), "--config", str(config), "--prompt-ids", "1"),
                       "ignore_eos must be true or false")
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "tokenizer.json").write_text("{not json")
    assert_clean_error(run_megakv("--model", str(broken), "--prompt", "hi"), "cannot read tokenizer")


def test_generate_bad_yaml_config_clear_error(megakv_checkpoint, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("block_size: 16\nblok_size: 32\n")
    assert_clean_error(run_megakv("--model", str(megakv_checkpoint("gqa", 1)), "--config", str(config),
                                  "--prompt-ids", "1"), "unknown option(s) blok_size")


@pytest.mark.mpi
def test_generate_wrong_rank_count_clear_error(megakv_checkpoint, run_mpi):
    proc = run_mpi(3, [MEGAKV, "generate", "--model", str(megakv_checkpoint("gqa", 2)), "--tp", "2",
                       "--prompt-ids", "1,2"], check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "world size 3" in proc.stderr
