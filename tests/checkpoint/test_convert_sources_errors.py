"""Bad inputs to the Megatron, DeepSpeed and megakv sources end with an error a user can act on."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megakv.checkpoint.convert import convert_checkpoint
from megakv.checkpoint.format import CheckpointError
from megakv.checkpoint.options import SourceOptions, parse_model_arg

CONVERT_TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERT_TOOL), *map(str, args)], capture_output=True, text=True)


def assert_cli_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert_checkpoint: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("source, fragments", [
    ("megatron", ("not a Megatron checkpoint", "latest_checkpointed_iteration.txt", "legacy", "torch_dist")),
    ("deepspeed", ("not a DeepSpeed checkpoint", "'latest'", "mp_rank_00_model_states.pt")),
    ("megakv", ("not a megakv checkpoint", "megakv_config.json")),
])
def test_cli_folder_of_no_known_checkpoint(tmp_path, source, fragments):
    (tmp_path / "empty").mkdir()
    assert_cli_error(run_cli("--source", source, "--input", tmp_path / "empty", "--output", tmp_path / "out",
                             "--tp", "1"), *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.mpi
@pytest.mark.slow
def test_megatron_errors(megatron_fixture, tmp_path):
    fixture = megatron_fixture("halves_untied")
    broken = tmp_path / "broken"
    shutil.copytree(fixture / "legacy", broken)
    shutil.rmtree(broken / "iter_0000010" / "mp_rank_01")
    with pytest.raises(CheckpointError, match=r"missing rank file mp_rank_01/model_optim_rng.pt"):
        convert_checkpoint("megatron", broken, tmp_path / "out", 1)
    for layout in ("legacy", "torch_dist"):
        options = SourceOptions(model_args={"num_query_groups": 4})
        with pytest.raises(CheckpointError, match=r"qkv has shape \(96, 64\).*query groups 4.*need \(128, 64\)"):
            convert_checkpoint("megatron", fixture / layout, tmp_path / "out", 1, options=options)
    # 8 heads in 2 KV groups: tp=3 divides neither, tp=8 is fine (KV heads replicated) but ffn 96 is not.
    assert_cli_error(run_cli("--source", "megatron", "--input", fixture / "legacy", "--output", tmp_path / "out",
                             "--tp", "3"), "tensor parallel size 3 does not divide num_attention_heads (8)")
    assert_cli_error(run_cli("--source", "megatron", "--input", fixture / "torch_dist", "--output",
                             tmp_path / "out", "--tp", "2", "--model-arg", "swiglu=false"), "SwiGLU")
    assert not (tmp_path / "out").exists()


@pytest.mark.mpi
@pytest.mark.slow
def test_deepspeed_missing_rank_file(deepspeed_fixture, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(deepspeed_fixture(0) / "ckpt", broken)
    (broken / "global_step1" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="missing rank file global_step1/mp_rank_00_model_states.pt"):
        convert_checkpoint("deepspeed", broken, tmp_path / "out", 1)


def test_megakv_reshard_tp_not_dividing_and_hf_needs_no_tp(megakv_checkpoint, tmp_path):
    assert_cli_error(run_cli("--source", "megakv", "--input", megakv_checkpoint("gqa", 1), "--output",
                             tmp_path / "out", "--tp", "3"), "does not divide")
    assert_cli_error(run_cli("--source", "megakv", "--input", megakv_checkpoint("gqa", 1), "--output",
                             tmp_path / "out"), "--tp is required")
    assert not (tmp_path / "out").exists()


def test_parse_model_arg():
    assert parse_model_arg("num_query_groups=8") == ("num_query_groups", 8)
    assert parse_model_arg("rotary-base=500000.5") == ("rotary_base", 500000.5)
    assert parse_model_arg("rotary_interleaved=True") == ("rotary_interleaved", True)
    assert parse_model_arg("normalization=RMSNorm") == ("normalization", "RMSNorm")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_model_arg("num_query_groups")
