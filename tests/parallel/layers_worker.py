"""mpirun worker: each TP layer at TP=2 equals its unsharded torch counterpart, forward and backward.

    mpirun -n 2 python layers_worker.py
Exits non-zero (an assertion) on the first mismatch.
"""
import torch
from torch import nn

from megakv.parallel import state
from megakv.parallel.layers import (ColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                    VocabParallelEmbedding, VocabParallelOutput)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def rows(full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    return full.chunk(tp, dim=0)[rank]


def check_mlp_pair(rank: int, tp: int) -> None:
    """Column-parallel (no gather) into row-parallel, as in the Megatron MLP; and a gathered column layer."""
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(12, 16, bias=True), nn.Linear(16, 12, bias=True)
    x = torch.randn(5, 12, requires_grad=True)
    expected = fc2(torch.relu(fc1(x)))
    expected.square().sum().backward()

    column = ColumnParallelLinear(12, 16, bias=True)
    row = RowParallelLinear(16, 12, bias=True)
    with torch.no_grad():
        column.weight.copy_(rows(fc1.weight, rank, tp))
        column.bias.copy_(rows(fc1.bias, rank, tp))
        row.weight.copy_(fc2.weight.chunk(tp, dim=1)[rank])
        row.bias.copy_(fc2.bias)
    x_tp = x.detach().clone().requires_grad_()
    out = row(torch.relu(column(x_tp)))
    out.square().sum().backward()
    close(out, expected, "column->row forward")
    close(x_tp.grad, x.grad, "column->row input grad")
    close(column.weight.grad, rows(fc1.weight.grad, rank, tp), "column weight grad")
    close(column.bias.grad, rows(fc1.bias.grad, rank, tp), "column bias grad")
    close(row.weight.grad, fc2.weight.grad.chunk(tp, dim=1)[rank], "row weight grad")
    close(row.bias.grad, fc2.bias.grad, "row bias grad")

    gathered = ColumnParallelLinear(12, 16, gather_output=True)
    with torch.no_grad():
        gathered.weight.copy_(rows(fc1.weight, rank, tp))
    x_tp = x.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out = gathered(x_tp)
    ref = nn.functional.linear(x_ref, fc1.weight)
    (out * torch.arange(16.0)).sum().backward()
    (ref * torch.arange(16.0)).sum().backward()
    close(out, ref, "gathered column forward")
    close(x_tp.grad, x_ref.grad, "gathered column input grad")

    scattered = RowParallelLinear(16, 12, input_is_parallel=False)
    with torch.no_grad():
        scattered.weight.copy_(fc2.weight.chunk(tp, dim=1)[rank])
    h_tp = torch.randn(5, 16, generator=torch.Generator().manual_seed(3)).requires_grad_()
    h_ref = h_tp.detach().clone().requires_grad_()
    scattered(h_tp).sum().backward()
    nn.functional.linear(h_ref, fc2.weight).sum().backward()
    close(h_tp.grad, h_ref.grad, "row (scattered input) input grad")


def check_qkv(rank: int, tp: int, num_heads: int, num_kv_heads: int) -> None:
    torch.manual_seed(1)
    head_dim, hidden = 4, 16
    q_proj = nn.Linear(hidden, num_heads * head_dim, bias=False)
    k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=False)
    v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=False)
    x = torch.randn(3, hidden)
    layer = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads)
    heads_per_rank = num_heads // tp
    kv_heads_per_rank = max(1, num_kv_heads // tp)
    first_kv_head = rank * num_kv_heads // tp
    kv_rows = slice(first_kv_head * head_dim, (first_kv_head + kv_heads_per_rank) * head_dim)
    with torch.no_grad():
        layer.weight.copy_(torch.cat([rows(q_proj.weight, rank, tp), k_proj.weight[kv_rows],
                                      v_proj.weight[kv_rows]]))
    q, k, v = layer.split_qkv(layer(x))
    expected_q = q_proj(x).view(3, num_heads, head_dim)[:, rank * heads_per_rank:(rank + 1) * heads_per_rank]
    expected_k = k_proj(x).view(3, num_kv_heads, head_dim)[:, first_kv_head:first_kv_head + kv_heads_per_rank]
    expected_v = v_proj(x).view(3, num_kv_heads, head_dim)[:, first_kv_head:first_kv_head + kv_heads_per_rank]
    close(q, expected_q, f"qkv q ({num_heads}/{num_kv_heads})")
    close(k, expected_k, f"qkv k ({num_heads}/{num_kv_heads})")
    close(v, expected_v, f"qkv v ({num_heads}/{num_kv_heads})")
    # The heads of every rank together are the unsharded projection.
    pieces = [torch.empty_like(q) for _ in range(tp)]
    torch.distributed.all_gather(pieces, q.contiguous(), group=state.get_tensor_model_parallel_group())
    close(torch.cat(pieces, dim=1), q_proj(x).view(3, num_heads, head_dim), "qkv gathered q")


def check_vocab(rank: int, tp: int, tied: bool) -> None:
    torch.manual_seed(2)
    vocab, dim = 37, 8
    table = nn.Embedding(vocab, dim)
    head = table if tied else nn.Linear(dim, vocab, bias=False)
    padded = torch.cat([table.weight.detach(), torch.zeros(1, dim)])
    embedding = VocabParallelEmbedding(vocab, dim)
    output = VocabParallelOutput(vocab, dim, tied_embedding=embedding if tied else None)
    assert (embedding.vocab_end_index - embedding.vocab_start_index) * tp == 38
    with torch.no_grad():
        embedding.weight.copy_(rows(padded, rank, tp))
        if not tied:
            output.weight.copy_(rows(torch.cat([head.weight.detach(), torch.zeros(1, dim)]), rank, tp))
    ids = torch.tensor([[0, 5, 18, 19, 36], [36, 1, 2, 20, 19]])
    expected = nn.functional.linear(table(ids), head.weight)
    expected.square().sum().backward()
    logits = output(embedding(ids))
    logits.square().sum().backward()
    close(logits, expected, f"embedding->output forward (tied={tied})")
    full_grad = torch.cat([table.weight.grad, torch.zeros(1, dim)])
    if not tied:
        close(output.weight.grad, rows(torch.cat([head.weight.grad, torch.zeros(1, dim)]), rank, tp),
              "output weight grad")
    close(embedding.weight.grad, rows(full_grad, rank, tp), f"embedding weight grad (tied={tied})")


def check_groups(num_instances: int, tp: int) -> None:
    rank = torch.distributed.get_rank()
    value = torch.tensor([float(rank)])
    torch.distributed.all_reduce(value, group=state.get_tensor_model_parallel_group())
    instance = state.get_instance_id()
    assert value.item() == sum(state.instance_ranks(instance, tp)), value
    value = torch.tensor([float(rank)])
    torch.distributed.all_reduce(value, group=state.get_dist_attention_group())
    assert value.item() == sum(state.dist_attention_ranks(state.get_tensor_model_parallel_rank(), tp,
                                                           num_instances)), value


def main() -> None:
    env = state.init_distributed()
    tp = 2
    num_instances = env.world_size // tp
    state.initialize_model_parallel(tp, num_instances)
    check_groups(num_instances, tp)
    rank = state.get_tensor_model_parallel_rank()
    check_mlp_pair(rank, tp)
    check_qkv(rank, tp, num_heads=8, num_kv_heads=2)
    check_qkv(rank, tp, num_heads=4, num_kv_heads=1)
    check_vocab(rank, tp, tied=False)
    check_vocab(rank, tp, tied=True)
    state.destroy_model_parallel()


if __name__ == "__main__":
    main()
