"""Tensor-parallel layers equal nn.Linear / nn.Embedding at TP=1 and TP=2; parallel-state layout and errors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from megakv.parallel import state
from megakv.parallel.layers import (ColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                    VocabParallelEmbedding, VocabParallelOutput)
from megakv.parallel.mappings import (copy_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
                                      reduce_from_tensor_model_parallel_region,
                                      scatter_to_tensor_model_parallel_region)

WORKER = Path(__file__).with_name("tp_layers_worker.py")


@pytest.fixture
def fresh_state():
    """Leave the module-level parallel state as a single process after the test."""
    yield
    state.destroy_model_parallel()


def copy_linear(layer: nn.Module, reference: nn.Linear) -> None:
    """Copy an unsharded nn.Linear into a TP=1 layer."""
    with torch.no_grad():
        layer.weight.copy_(reference.weight)
        if reference.bias is not None:
            layer.bias.copy_(reference.bias)


def forward_backward(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input gradient of a weighted sum of module(x)."""
    x = x.detach().clone().requires_grad_()
    out = module(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out, x.grad


@pytest.mark.mpi
def test_tp_layers_tp2_equal_unsharded_forward_backward(run_mpi):
    run_mpi(2, [sys.executable, str(WORKER)])


@pytest.mark.mpi
def test_parallel_state_two_instances_groups_and_layers(run_mpi):
    run_mpi(4, [sys.executable, str(WORKER), "--instances", "2"])


@pytest.mark.parametrize("gather_output", [False, True])
def test_column_parallel_linear_tp1_equals_linear(gather_output):
    torch.manual_seed(0)
    reference = nn.Linear(6, 10, bias=True)
    layer = ColumnParallelLinear(6, 10, bias=True, gather_output=gather_output)
    copy_linear(layer, reference)
    x = torch.randn(3, 6)
    for actual, expected in zip(forward_backward(layer, x), forward_backward(reference, x)):
        torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)


@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_linear_tp1_equals_linear(input_is_parallel):
    torch.manual_seed(0)
    reference = nn.Linear(10, 6, bias=True)
    layer = RowParallelLinear(10, 6, bias=True, input_is_parallel=input_is_parallel)
    copy_linear(layer, reference)
    x = torch.randn(2, 3, 10)
    for actual, expected in zip(forward_backward(layer, x), forward_backward(reference, x)):
        torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)


def test_qkv_parallel_linear_tp1_splits_heads():
    torch.manual_seed(0)
    hidden_size, head_dim, num_heads, num_kv_heads = 16, 4, 8, 2
    projections = [nn.Linear(hidden_size, n * head_dim) for n in (num_heads, num_kv_heads, num_kv_heads)]
    layer = QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, bias=True)
    assert (layer.num_heads_per_partition, layer.num_kv_heads_per_partition) == (num_heads, num_kv_heads)
    with torch.no_grad():
        layer.weight.copy_(torch.cat([p.weight for p in projections]))
        layer.bias.copy_(torch.cat([p.bias for p in projections]))
    x = torch.randn(5, hidden_size)
    q, k, v = layer.split_qkv(layer(x))
    assert q.shape == (5, num_heads, head_dim) and k.shape == v.shape == (5, num_kv_heads, head_dim)
    for actual, projection in zip((q, k, v), projections):
        torch.testing.assert_close(actual, projection(x).unflatten(-1, (-1, head_dim)))


def test_vocab_parallel_embedding_tp1_equals_embedding():
    torch.manual_seed(0)
    reference = nn.Embedding(11, 6)
    layer = VocabParallelEmbedding(11, 6)
    assert (layer.vocab_start_index, layer.vocab_end_index) == (0, 11)
    with torch.no_grad():
        layer.weight.copy_(reference.weight)
    ids = torch.tensor([[0, 3, 10], [10, 10, 1]])
    out, expected = layer(ids), reference(ids)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)


def test_vocab_parallel_output_tp1_equals_linear():
    torch.manual_seed(0)
    reference = nn.Linear(6, 11, bias=False)
    layer = VocabParallelOutput(11, 6)
    copy_linear(layer, reference)
    x = torch.randn(4, 6)
    for actual, expected in zip(forward_backward(layer, x), forward_backward(reference, x)):
        torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)


def test_vocab_parallel_output_tied_shares_embedding_weight():
    embedding = VocabParallelEmbedding(11, 6)
    embedding.reset_parameters()
    output = VocabParallelOutput(11, 6, tied_embedding=embedding)
    assert list(output.parameters()) == [] and "weight" not in output.state_dict()
    x = torch.randn(4, 6)
    torch.testing.assert_close(output(x), x @ embedding.weight.T)


def test_vocab_parallel_output_tied_shape_mismatch_error():
    with pytest.raises(ValueError, match="tied embedding is 11 x 6, the output layer 12 x 6"):
        VocabParallelOutput(12, 6, tied_embedding=VocabParallelEmbedding(11, 6))


def test_tp_layers_meta_device_allocates_nothing():
    with torch.device("meta"):
        layers = [ColumnParallelLinear(8, 8, bias=True), RowParallelLinear(8, 8), QKVParallelLinear(8, 2, 4, 2),
                  VocabParallelEmbedding(10, 8), VocabParallelOutput(10, 8)]
    assert all(p.is_meta for layer in layers for p in layer.parameters())


def test_tp_layers_params_dtype_and_device():
    layer = ColumnParallelLinear(4, 8, params_dtype=torch.bfloat16, device="cpu")
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.device.type == "cpu"


def test_mappings_tp1_return_input():
    x = torch.randn(2, 3)
    for mapping in (copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
                    scatter_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region):
        assert mapping(x) is x


def test_parallel_state_defaults_to_single_process():
    assert not state.model_parallel_is_initialized()
    assert state.get_tensor_model_parallel_world_size() == 1
    assert state.get_tensor_model_parallel_rank() == 0
    assert state.get_tensor_model_parallel_group() is None
    assert state.get_tensor_model_parallel_src_rank() == 0
    assert (state.get_instance_id(), state.get_num_instances()) == (0, 1)
    assert state.get_dist_attention_group() is None
    assert (state.get_dist_attention_rank(), state.get_dist_attention_world_size()) == (0, 1)


def test_init_distributed_single_process_without_launcher(monkeypatch):
    for variable in (*state.MPI_LAUNCH_VARIABLES, "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    env = state.init_distributed()
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    assert not torch.distributed.is_initialized()


def test_init_distributed_refuses_wrong_layout_before_any_rendezvous(monkeypatch):
    # Rank 0 of 3 with no other rank started: a rendezvous would wait for them, the layout check must not.
    for variable in state.MPI_LAUNCH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3 does not fit --tp 2 x --instances 2: launch 4 ranks"):
        state.init_distributed(layout=(2, 2))
    assert not torch.distributed.is_initialized()


def test_initialize_model_parallel_single_process_without_group(fresh_state):
    state.initialize_model_parallel(1, 1)
    assert state.model_parallel_is_initialized()
    assert state.get_tensor_model_parallel_group() is None
    with pytest.raises(RuntimeError, match="already initialized"):
        state.initialize_model_parallel(1, 1)
    state.destroy_model_parallel()
    assert not state.model_parallel_is_initialized()


@pytest.mark.parametrize(("tp", "num_instances", "message"), [
    (2, 1, "world size 1 does not fit --tp 2 x --instances 1: launch 2 ranks"),
    (1, 3, "world size 1 does not fit --tp 1 x --instances 3: launch 3 ranks"),
    (0, 1, "must both be at least 1"),
])
def test_initialize_model_parallel_wrong_world_size_error(fresh_state, tp, num_instances, message):
    with pytest.raises(ValueError, match=message):
        state.initialize_model_parallel(tp, num_instances)
    assert not state.model_parallel_is_initialized()


def test_instance_ranks_instance_major_layout():
    assert state.instance_ranks(0, 4) == [0, 1, 2, 3]
    assert state.instance_ranks(1, 4) == [4, 5, 6, 7]


def test_dist_attention_ranks_same_tp_rank_of_every_instance():
    assert state.dist_attention_ranks(2, 4, 3) == [2, 6, 10]
    assert state.dist_attention_ranks(0, 1, 2) == [0, 1]


@pytest.mark.parametrize(("tp", "num_instances"), [(1, 1), (2, 2), (4, 3), (1, 4)])
def test_parallel_state_groups_partition_the_world(tp, num_instances):
    world = list(range(tp * num_instances))
    tp_groups = [state.instance_ranks(i, tp) for i in range(num_instances)]
    da_groups = [state.dist_attention_ranks(t, tp, num_instances) for t in range(tp)]
    assert sorted(sum(tp_groups, [])) == world and sorted(sum(da_groups, [])) == world
    # Each TP group and each DistAttention group meet in exactly one rank.
    assert all(len(set(a) & set(b)) == 1 for a in tp_groups for b in da_groups)
