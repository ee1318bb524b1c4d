"""DeepSpeed -> megakv: megakv's logits on the converted checkpoint equal DeepSpeed's trained module.

The fixtures are one training step of a Hugging Face LLaMA under DeepSpeed on two
data-parallel gloo ranks (see conftest.py); with ZeRO-1/2/3 the weights come back through
DeepSpeed's own fp32 reconstruction from the partitioned optimizer states.
"""
from __future__ import annotations

import shutil

import pytest

from framework_oracle import check_matches_framework
from megakv.checkpoint.convert import convert_checkpoint
from megakv.checkpoint.format import CheckpointError
from megakv.checkpoint.options import SourceOptions

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_logits_equal_deepspeed_tp1(deepspeed_fixture, tmp_path, stage):
    fixture = deepspeed_fixture(stage)
    assert bool(list((fixture / "ckpt" / "global_step1").glob("*optim_states.pt"))) == (stage > 0)
    info = convert_checkpoint("deepspeed", fixture / "ckpt", tmp_path / "out", 1)
    check_matches_framework(info, fixture)


def test_deepspeed_tag_and_hf_config_flags(deepspeed_fixture, tmp_path):
    fixture = deepspeed_fixture(1)
    root = tmp_path / "ckpt"
    shutil.copytree(fixture / "ckpt", root)
    (root / "latest").unlink()
    config = tmp_path / "elsewhere.json"
    (root / "config.json").rename(config)
    with pytest.raises(CheckpointError, match="pass --tag"):
        convert_checkpoint("deepspeed", root, tmp_path / "out", 1)
    with pytest.raises(CheckpointError, match="--hf-config"):
        convert_checkpoint("deepspeed", root, tmp_path / "out", 1, options=SourceOptions(tag="global_step1"))
    options = SourceOptions(tag="global_step1", hf_config=config)
    check_matches_framework(convert_checkpoint("deepspeed", root, tmp_path / "out", 1, options=options), fixture)
