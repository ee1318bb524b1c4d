"""The demo: make_demo_model builds both models, and the demo config serves real answers across instances."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from settled import assert_settled

from megakv.checkpoint.format import read_checkpoint_info

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MEGAKV = str(Path(sys.executable).with_name("megakv"))


def make_demo_model(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_model.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_make_demo_model_random_builds_tp2_with_tokenizer(tmp_path):
    proc = make_demo_model("--random", "--output", tmp_path / "ckpt", "--hf-output", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    info = read_checkpoint_info(tmp_path / "ckpt")
    assert (info.tensor_parallel_size, info.model.num_layers, info.model.vocab_size) == (2, 4, 259)
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()


def test_make_demo_model_random_takes_a_shape_and_keeps_only_its_own(tmp_path):
    folders = ("--output", tmp_path / "ckpt", "--hf-output", tmp_path / "hf")
    proc = make_demo_model("--random", "--tp", "1", "--hidden-size", "128", "--heads", "2", *folders)
    assert proc.returncode == 0, proc.stderr
    model = read_checkpoint_info(tmp_path / "ckpt").model
    assert (model.hidden_size, model.num_attention_heads, model.num_kv_heads, model.head_dim) == (128, 2, 1, 64)
    again = make_demo_model("--random", "--tp", "1", *folders)
    assert again.returncode == 2 and "holds a model of hidden size 128 with 2 heads, not 64 with 4" in again.stderr
    odd = make_demo_model("--random", "--heads", "3", "--output", tmp_path / "odd", "--hf-output", tmp_path / "odd-hf")
    assert odd.returncode == 2 and "must be a positive multiple of --heads 3" in odd.stderr
    assert not (tmp_path / "odd").exists()


def test_make_demo_model_converts_smollm2_and_keeps_it(smollm2, tmp_path):
    proc = make_demo_model("--output", tmp_path / "ckpt", "--tp", "3")
    assert proc.returncode == 0, proc.stderr
    info = read_checkpoint_info(tmp_path / "ckpt")
    assert (info.tensor_parallel_size, info.model.num_attention_heads, info.model.dtype) == (3, 9, "float32")
    assert (tmp_path / "ckpt" / "chat_template.jinja").read_text() == smollm2.tokenizer.chat_template
    again = make_demo_model("--output", tmp_path / "ckpt", "--tp", "1")
    assert again.returncode == 2 and "holds the demo checkpoint for tp=3, not tp=1" in again.stderr


@pytest.mark.mpi
def test_demo_config_borrows_for_the_long_chat_and_answers(smollm2, run_mpi):
    proc = run_mpi(3, [MEGAKV, "generate", "--config", str(ROOT / "configs" / "demo.yaml"), "--model",
                       str(smollm2.checkpoint(1)), "--prompts-file", str(ROOT / "configs" / "demo_prompts.jsonl"),
                       "--json"])
    *records, report = [json.loads(line) for line in proc.stdout.splitlines()]
    assert records[0]["num_remote_blocks"] > 0 and records[0]["block_instances"] == [0, 1, 2]
    assert "40962" in records[0]["text"] and "Paris" in records[1]["text"]
    assert_settled(report["cluster"])
