"""mpirun worker: every TP layer equals its unsharded torch counterpart, forward and backward.

    mpirun -n 2 python tp_layers_worker.py                   # tp 2, one instance
    mpirun -n 4 python tp_layers_worker.py --instances 2     # tp 2, two instances

Each rank builds the unsharded nn.Linear / nn.Embedding from a fixed seed, copies
its slice into the TP layer and compares outputs, input gradients and
weight-shard gradients. Raises (exit status non-zero) on the first mismatch.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from megakv.parallel import state
from megakv.parallel.layers import (ColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                    VocabParallelEmbedding, VocabParallelOutput)

TP = 2


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """assert_close in fp32 with a message naming the rank and the quantity."""
    rank = dist.get_rank()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"[rank {rank}] {what}: {m}")


def rows(full: torch.Tensor, tp_rank: int) -> torch.Tensor:
    """This rank's block of rows (output features / vocabulary) of an evenly split tensor."""
    return full.chunk(TP, dim=0)[tp_rank]


def columns(full: torch.Tensor, tp_rank: int) -> torch.Tensor:
    """This rank's block of columns (input features) of an evenly split weight."""
    return full.chunk(TP, dim=1)[tp_rank]


def pad_rows(full: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Zero rows appended up to num_rows, as the padded vocabulary has."""
    return torch.cat([full, full.new_zeros(num_rows - full.shape[0], *full.shape[1:])])


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh gradient-tracking copy of x."""
    return x.detach().clone().requires_grad_()


def expect_value_error(build: Callable[[], object], message: str) -> None:
    """build() must raise a ValueError containing message."""
    try:
        build()
    except ValueError as err:
        assert message in str(err), f"unexpected error text: {err}"
    else:
        raise AssertionError(f"no ValueError ({message!r})")


def check_groups(num_instances: int) -> None:
    """The TP and DistAttention groups hold the ranks the instance-major layout says."""
    rank = dist.get_rank()
    instance_id, tp_rank = divmod(rank, TP)
    assert state.get_tensor_model_parallel_world_size() == TP
    assert state.get_tensor_model_parallel_rank() == tp_rank
    assert state.get_instance_id() == instance_id
    assert state.get_num_instances() == num_instances
    assert state.get_tensor_model_parallel_src_rank() == instance_id * TP
    assert state.get_dist_attention_rank() == instance_id
    assert state.get_dist_attention_world_size() == num_instances
    for group, expected_ranks in ((state.get_tensor_model_parallel_group(), state.instance_ranks(instance_id, TP)),
                                  (state.get_dist_attention_group(),
                                   state.dist_attention_ranks(tp_rank, TP, num_instances))):
        total = torch.tensor([float(rank)])
        dist.all_reduce(total, group=group)
        assert total.item() == sum(expected_ranks), (rank, total.item(), expected_ranks)
        assert dist.get_world_size(group) == len(expected_ranks)


def check_mlp_pair(tp_rank: int, gather_output: bool) -> None:
    """ColumnParallelLinear -> relu -> RowParallelLinear, the Megatron MLP (gathered or not in between)."""
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(12, 16, bias=True), nn.Linear(16, 12, bias=True)
    x = torch.randn(2, 5, 12)
    probe = torch.randn(2, 5, 12)
    x_ref = leaf(x)
    (fc2(torch.relu(fc1(x_ref))) * probe).sum().backward()

    column = ColumnParallelLinear(12, 16, bias=True, gather_output=gather_output)
    row = RowParallelLinear(16, 12, bias=True, input_is_parallel=not gather_output)
    assert column.output_size_per_partition == 8 and row.input_size_per_partition == 8
    with torch.no_grad():
        column.weight.copy_(rows(fc1.weight, tp_rank))
        column.bias.copy_(rows(fc1.bias, tp_rank))
        row.weight.copy_(columns(fc2.weight, tp_rank))
        row.bias.copy_(fc2.bias)
    x_tp = leaf(x)
    hidden = column(x_tp)
    assert hidden.shape[-1] == (16 if gather_output else 8)
    out = row(torch.relu(hidden))
    (out * probe).sum().backward()

    what = f"mlp (gather_output={gather_output})"
    close(out, fc2(torch.relu(fc1(x))), f"{what} forward")
    close(x_tp.grad, x_ref.grad, f"{what} input grad")
    close(column.weight.grad, rows(fc1.weight.grad, tp_rank), f"{what} column weight grad")
    close(column.bias.grad, rows(fc1.bias.grad, tp_rank), f"{what} column bias grad")
    close(row.weight.grad, columns(fc2.weight.grad, tp_rank), f"{what} row weight grad")
    close(row.bias.grad, fc2.bias.grad, f"{what} row bias grad")


def check_qkv(tp_rank: int, num_heads: int, num_kv_heads: int) -> None:
    """QKVParallelLinear holds [this rank's q heads; its k heads; its v heads], KV replicated if tp > kv heads."""
    torch.manual_seed(1)
    hidden_size, head_dim, num_tokens = 16, 4, 3
    q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=True)
    k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=True)
    v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=True)
    x = torch.randn(num_tokens, hidden_size)
    probes = [torch.randn(num_tokens, n, head_dim) for n in (num_heads, num_kv_heads, num_kv_heads)]

    heads_per_rank = num_heads // TP
    kv_heads_per_rank = max(1, num_kv_heads // TP)

    def head_ranges(rank: int) -> tuple[slice, slice]:
        # The KV heads rank r serves are those its query heads attend with.
        first_kv_head = rank * num_kv_heads // TP
        return (slice(rank * heads_per_rank, (rank + 1) * heads_per_rank),
                slice(first_kv_head, first_kv_head + kv_heads_per_rank))

    def reference_loss(x_ref: torch.Tensor, ranks: list[int]) -> torch.Tensor:
        # [T, heads * D] -> [T, heads, D]
        full = [proj(x_ref).unflatten(-1, (-1, head_dim)) for proj in (q_proj, k_proj, v_proj)]
        loss = x_ref.new_zeros(())
        for rank in ranks:
            q_heads, kv_heads = head_ranges(rank)
            for out, probe, heads in zip(full, probes, (q_heads, kv_heads, kv_heads)):
                loss = loss + (out[:, heads] * probe[:, heads]).sum()
        return loss

    layer = QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, bias=True)
    assert (layer.num_heads_per_partition, layer.num_kv_heads_per_partition) == (heads_per_rank, kv_heads_per_rank)
    q_heads, kv_heads = head_ranges(tp_rank)
    q_rows = slice(q_heads.start * head_dim, q_heads.stop * head_dim)
    kv_rows = slice(kv_heads.start * head_dim, kv_heads.stop * head_dim)

    def local_slice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([q[q_rows], k[kv_rows], v[kv_rows]])

    with torch.no_grad():
        layer.weight.copy_(local_slice(q_proj.weight, k_proj.weight, v_proj.weight))
        layer.bias.copy_(local_slice(q_proj.bias, k_proj.bias, v_proj.bias))
    x_tp = leaf(x)
    q, k, v = layer.split_qkv(layer(x_tp))
    loss = sum((out * probe[:, heads]).sum() for out, probe, heads in zip((q, k, v), probes,
                                                                         (q_heads, kv_heads, kv_heads)))
    loss.backward()

    what = f"qkv ({num_heads} heads, {num_kv_heads} kv heads)"
    with torch.no_grad():
        expected = [proj(x).unflatten(-1, (-1, head_dim)) for proj in (q_proj, k_proj, v_proj)]
    close(q, expected[0][:, q_heads], f"{what} q")
    close(k, expected[1][:, kv_heads], f"{what} k")
    close(v, expected[2][:, kv_heads], f"{what} v")
    # The input gradient sums every rank's heads (replicated KV heads once per replica).
    x_ref = leaf(x)
    reference_loss(x_ref, list(range(TP))).backward()
    close(x_tp.grad, x_ref.grad, f"{what} input grad")
    # A shard's gradient comes from this rank's heads only.
    for proj in (q_proj, k_proj, v_proj):
        proj.zero_grad()
    reference_loss(leaf(x), [tp_rank]).backward()
    close(layer.weight.grad, local_slice(q_proj.weight.grad, k_proj.weight.grad, v_proj.weight.grad),
          f"{what} weight grad")
    close(layer.bias.grad, local_slice(q_proj.bias.grad, k_proj.bias.grad, v_proj.bias.grad), f"{what} bias grad")


def check_embedding(tp_rank: int) -> None:
    """VocabParallelEmbedding over a vocabulary of 37, padded to 38 = 2 x 19."""
    torch.manual_seed(2)
    vocab_size, dim = 37, 8
    table = nn.Embedding(vocab_size, dim)
    # Both ends of each rank's slice, and repeats (their gradients accumulate).
    ids = torch.tensor([[0, 5, 18, 19, 36], [36, 1, 18, 20, 19]])
    probe = torch.randn(2, 5, dim)
    (table(ids) * probe).sum().backward()

    embedding = VocabParallelEmbedding(vocab_size, dim)
    assert (embedding.vocab_start_index, embedding.vocab_end_index) == (19 * tp_rank, 19 * (tp_rank + 1))
    with torch.no_grad():
        embedding.weight.copy_(rows(pad_rows(table.weight, 38), tp_rank))
    out = embedding(ids)
    (out * probe).sum().backward()
    close(out, table(ids), "embedding forward")
    close(embedding.weight.grad, rows(pad_rows(table.weight.grad, 38), tp_rank), "embedding weight grad")


def check_output(tp_rank: int) -> None:
    """Untied VocabParallelOutput: full logits over 37 entries from a padded 2 x 19 split."""
    torch.manual_seed(3)
    vocab_size, dim = 37, 8
    head = nn.Linear(dim, vocab_size, bias=False)
    hidden = torch.randn(2, 5, dim)
    probe = torch.randn(2, 5, vocab_size)
    hidden_ref = leaf(hidden)
    (head(hidden_ref) * probe).sum().backward()

    output = VocabParallelOutput(vocab_size, dim)
    with torch.no_grad():
        output.weight.copy_(rows(pad_rows(head.weight, 38), tp_rank))
    hidden_tp = leaf(hidden)
    logits = output(hidden_tp)
    (logits * probe).sum().backward()
    close(logits, head(hidden), "output forward")
    close(hidden_tp.grad, hidden_ref.grad, "output input grad")
    close(output.weight.grad, rows(pad_rows(head.weight.grad, 38), tp_rank), "output weight grad")


def check_tied_embedding_output(tp_rank: int) -> None:
    """Embedding -> tied output layer: one shared shard collects both gradients."""
    torch.manual_seed(4)
    vocab_size, dim = 37, 8
    table = nn.Embedding(vocab_size, dim)
    ids = torch.tensor([[0, 18, 19, 36], [2, 19, 19, 30]])
    probe = torch.randn(2, 4, vocab_size)
    (nn.functional.linear(table(ids), table.weight) * probe).sum().backward()

    embedding = VocabParallelEmbedding(vocab_size, dim)
    output = VocabParallelOutput(vocab_size, dim, tied_embedding=embedding)
    assert list(output.parameters()) == [] and output.output_weight is embedding.weight
    with torch.no_grad():
        embedding.weight.copy_(rows(pad_rows(table.weight, 38), tp_rank))
    logits = output(embedding(ids))
    (logits * probe).sum().backward()
    close(logits, nn.functional.linear(table(ids), table.weight), "tied forward")
    close(embedding.weight.grad, rows(pad_rows(table.weight.grad, 38), tp_rank), "tied weight grad")


def check_shape_errors() -> None:
    """Sizes that do not split over the TP ranks are refused with a ValueError."""
    expect_value_error(lambda: ColumnParallelLinear(4, 7), "output size (7) is not divisible")
    expect_value_error(lambda: RowParallelLinear(7, 4), "input size (7) is not divisible")
    expect_value_error(lambda: QKVParallelLinear(16, 4, 6, 3), "must divide one another")
    expect_value_error(lambda: QKVParallelLinear(16, 4, 5, 1), "num_attention_heads (5) is not divisible")


def main() -> None:
    """Initialise TP=2 over the launched ranks and run every check."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=1)
    args = parser.parse_args()
    env = state.init_distributed()
    assert env.launcher == "mpi" and env.world_size == TP * args.instances, env
    state.initialize_model_parallel(TP, args.instances)
    try:
        check_groups(args.instances)
        tp_rank = state.get_tensor_model_parallel_rank()
        check_mlp_pair(tp_rank, gather_output=False)
        check_mlp_pair(tp_rank, gather_output=True)
        check_qkv(tp_rank, num_heads=8, num_kv_heads=2)
        check_qkv(tp_rank, num_heads=4, num_kv_heads=1)
        check_embedding(tp_rank)
        check_output(tp_rank)
        check_tied_embedding_output(tp_rank)
        check_shape_errors()
    finally:
        state.destroy_model_parallel()


if __name__ == "__main__":
    main()
