"""Tensor-parallel layers equal their unsharded torch counterparts; parallel-state layout and errors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from megakv.parallel import state
from megakv.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, \
    VocabParallelOutput

WORKER = Path(__file__).with_name("layers_worker.py")


@pytest.mark.mpi
def test_tp_layers_tp2_equal_unsharded_forward_backward(run_mpi):
    run_mpi(2, [sys.executable, str(WORKER)])


@pytest.mark.mpi
def test_tp_layers_two_instances_groups_and_layers(run_mpi):
    run_mpi(4, [sys.executable, str(WORKER)])


def test_tp_layers_single_process_equal_torch():
    torch.manual_seed(0)
    reference = nn.Linear(6, 10, bias=True)
    column, row = ColumnParallelLinear(6, 10, bias=True), RowParallelLinear(10, 6, bias=True)
    embedding, output = VocabParallelEmbedding(11, 6), VocabParallelOutput(11, 6)
    for layer in (column, row, embedding, output):
        layer.reset_parameters()
    with torch.no_grad():
        column.weight.copy_(reference.weight)
        column.bias.copy_(reference.bias)
    x = torch.randn(4, 6)
    torch.testing.assert_close(column(x), reference(x))
    ids = torch.tensor([0, 3, 10])
    torch.testing.assert_close(embedding(ids), embedding.weight[ids])
    torch.testing.assert_close(output(x), x @ output.weight.T)


def test_parallel_state_rank_layout():
    assert state.instance_ranks(1, 4) == [4, 5, 6, 7]
    assert state.dist_attention_ranks(2, 4, 3) == [2, 6, 10]


def test_parallel_state_defaults_to_single_process():
    assert state.get_tensor_model_parallel_world_size() == 1
    assert state.get_tensor_model_parallel_rank() == 0
    assert state.get_tensor_model_parallel_group() is None
    assert state.get_num_instances() == 1


def test_parallel_state_wrong_world_size_error():
    with pytest.raises(ValueError, match="world size 1 does not fit --tp 2 x --instances 1: launch 2 ranks"):
        state.initialize_model_parallel(2, 1)
    state.destroy_model_parallel()
