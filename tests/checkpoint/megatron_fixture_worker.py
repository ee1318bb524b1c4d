"""mpirun worker: build a LLaMA-like megatron-core GPTModel at TP=2 on gloo, save it, record its logits.

    mpirun -n 2 python megatron_fixture_worker.py OUT_DIR PROMPT_JSON [--interleaved] [--tied]

Writes ``OUT_DIR/legacy`` (``iter_0000010/mp_rank_0R/model_optim_rng.pt`` and
``latest_checkpointed_iteration.txt``), ``OUT_DIR/torch_dist`` (``iter_0000010/``
written by ``megatron.core.dist_checkpointing``) and ``OUT_DIR/logits.pt``: the
full-vocabulary logits of Megatron's own forward pass over the prompt, and
``OUT_DIR/greedy.json``: the tokens its greedy decoding appends to the prompt.
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

ITERATION = 10
# Dimensions that catch layout bugs: 4 queries per KV group, groups >= TP, ffn != hidden.
DIMS = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=2)
VOCAB_SIZE = 302
MAX_POSITIONS = 128
ROTARY_BASE = 10000
NUM_GREEDY_TOKENS = 6  # as tests/checkpoint/conftest.py


def patch_cuda_calls() -> None:
    """megatron-core calls CUDA in a few CPU-capable paths (see shared/CHECKPOINTS.md)."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None


def build_model(interleaved: bool, tied: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(**DIMS, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                               normalization="RMSNorm", layernorm_epsilon=1e-5, init_method_std=0.2,
                               use_cpu_initialization=True, tensor_model_parallel_size=2,
                               rotary_interleaved=interleaved, hidden_dropout=0.0, attention_dropout=0.0,
                               params_dtype=torch.float32)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB_SIZE,
                     max_sequence_length=MAX_POSITIONS, position_embedding_type="rope", rotary_base=ROTARY_BASE,
                     share_embeddings_and_output_weights=tied, parallel_output=False).eval()
    # Norm weights start at ones; perturb them (identically on every rank) so a swapped norm shows in logits.
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def forward(model, token_ids: list[int]) -> torch.Tensor:
    """Megatron's own forward pass: [S, vocab] logits, with an explicit causal mask (its default is on CUDA)."""
    tokens = torch.tensor([token_ids])
    positions = torch.arange(len(token_ids)).unsqueeze(0)
    causal_mask = torch.triu(torch.ones(1, 1, len(token_ids), len(token_ids), dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        return model(tokens, positions, causal_mask)[0].clone()  # [S, vocab]


def checkpoint_args(interleaved: bool, tied: bool) -> argparse.Namespace:
    """The ``args`` Megatron-LM's training loop stores beside the weights."""
    return argparse.Namespace(**DIMS, group_query_attention=True, kv_channels=8, padded_vocab_size=VOCAB_SIZE,
                              max_position_embeddings=MAX_POSITIONS, seq_length=MAX_POSITIONS, norm_epsilon=1e-5,
                              rotary_base=ROTARY_BASE, rotary_interleaved=interleaved,
                              untie_embeddings_and_output_weights=not tied, swiglu=True,
                              normalization="RMSNorm", position_embedding_type="rope", add_bias_linear=False,
                              tensor_model_parallel_size=2, pipeline_model_parallel_size=1,
                              params_dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("prompt_json")
    parser.add_argument("--interleaved", action="store_true")
    parser.add_argument("--tied", action="store_true")
    args = parser.parse_args()
    patch_cuda_calls()
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megakv.parallel import state

    env = state.init_distributed()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
    torch.manual_seed(1234)
    model = build_model(args.interleaved, args.tied)
    rank = parallel_state.get_tensor_model_parallel_rank()
    out = Path(args.out_dir)

    legacy = out / "legacy"
    rank_dir = legacy / f"iter_{ITERATION:07d}" / f"mp_rank_{rank:02d}"
    rank_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "checkpoint_version": 3.0, "iteration": ITERATION,
                "args": checkpoint_args(args.interleaved, args.tied)}, rank_dir / "model_optim_rng.pt")
    dist_dir = out / "torch_dist" / f"iter_{ITERATION:07d}"
    if env.rank == 0:
        dist_dir.mkdir(parents=True, exist_ok=True)
        for root in (legacy, out / "torch_dist"):
            (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    torch.distributed.barrier()
    # As Megatron-LM does: non-tensor entries land in common.pt, the weights in *.distcp.
    dist_checkpointing.save({"model": model.sharded_state_dict(), "checkpoint_version": 3.0,
                             "iteration": ITERATION, "args": checkpoint_args(args.interleaved, args.tied)},
                            str(dist_dir))

    prompt = json.loads(Path(args.prompt_json).read_text())
    logits = forward(model, prompt)
    greedy = list(prompt)
    for _ in range(NUM_GREEDY_TOKENS):  # no KV cache: re-run the whole sequence each step
        greedy.append(int(forward(model, greedy)[-1].argmax()))
    if env.rank == 0:
        torch.save(logits, out / "logits.pt")
        (out / "greedy.json").write_text(json.dumps(greedy[len(prompt):]))
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
