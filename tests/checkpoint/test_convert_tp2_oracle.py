"""At serving TP=2 (mpirun, gloo) megakv reproduces Megatron's and DeepSpeed's own logits and greedy tokens."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from framework_oracle import NUM_GREEDY_TOKENS, PROMPT, framework_outputs, run_mpirun
from megakv.checkpoint.convert import convert_checkpoint

WORKER = Path(__file__).with_name("logits_worker.py")


@pytest.mark.mpi
@pytest.mark.slow
def test_converted_checkpoints_match_frameworks_tp2(megatron_fixture, deepspeed_fixture, tmp_path):
    cases = {  # name -> (source, input folder, fixture folder with the framework's outputs)
        "megatron-legacy-halves": ("megatron", megatron_fixture("halves_untied") / "legacy",
                                   megatron_fixture("halves_untied")),
        "megatron-dist-interleaved": ("megatron", megatron_fixture("interleaved_tied") / "torch_dist",
                                      megatron_fixture("interleaved_tied")),
        "deepspeed-zero0": ("deepspeed", deepspeed_fixture(0) / "ckpt", deepspeed_fixture(0)),
        "deepspeed-zero1": ("deepspeed", deepspeed_fixture(1) / "ckpt", deepspeed_fixture(1)),
    }
    jobs = []
    for name, (source, input_dir, _) in cases.items():
        convert_checkpoint(source, input_dir, tmp_path / name, 2)
        jobs.append({"checkpoint": str(tmp_path / name), "prompt": PROMPT, "num_tokens": NUM_GREEDY_TOKENS})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run_mpirun(2, [sys.executable, str(WORKER), str(tmp_path / "jobs.json"), str(tmp_path / "out.pt")])
    results = torch.load(tmp_path / "out.pt")
    for (name, (_, _, fixture)), result in zip(cases.items(), results, strict=True):
        expected_logits, expected_greedy = framework_outputs(fixture)
        torch.testing.assert_close(result["logits"], expected_logits, atol=1e-4, rtol=0, msg=name)
        assert result["greedy"] == expected_greedy, name
