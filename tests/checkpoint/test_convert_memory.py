"""Streaming: converting a many-layer checkpoint holds about one layer in memory, not the model.

The checkpoints are a legacy per-rank Megatron one at TP=2, and a GGUF file of Q8_0
matrices, with 32 layers of random weights (3.0 MB per layer in fp32, 98 MB in all);
each conversion runs in a fresh process that samples its own anonymous RSS
(convert_memory_worker.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType

from gguf_files import write_llama_gguf

WORKER = Path(__file__).with_name("convert_memory_worker.py")
NUM_LAYERS, HIDDEN, FFN, VOCAB, NUM_HEADS, NUM_GROUPS, HEAD_DIM, TP = 32, 256, 768, 1024, 8, 2, 32, 2
LAYER_BYTES = 4 * ((NUM_HEADS + 2 * NUM_GROUPS) * HEAD_DIM * HIDDEN + HIDDEN * NUM_HEADS * HEAD_DIM
                   + 3 * FFN * HIDDEN + 2 * HIDDEN)
MODEL_BYTES = NUM_LAYERS * LAYER_BYTES + 4 * (2 * VOCAB * HIDDEN + HIDDEN)
# Peak growth allowed: the unsharded layer, every rank's shard of it, one more in flight, plus allocator slack.
PEAK_BOUND_BYTES = 4 * LAYER_BYTES + 6 * 2**20


def save_many_layer_megatron(root: Path) -> None:
    """A legacy Megatron TP=2 checkpoint with the per-rank shapes megatron-core writes."""
    args = argparse.Namespace(num_layers=NUM_LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN,
                              num_attention_heads=NUM_HEADS, num_query_groups=NUM_GROUPS, group_query_attention=True,
                              kv_channels=HEAD_DIM, padded_vocab_size=VOCAB, max_position_embeddings=256,
                              swiglu=True, untie_embeddings_and_output_weights=True, tensor_model_parallel_size=TP)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    for tp_rank in range(TP):
        model = {"embedding.word_embeddings.weight": rand(VOCAB // TP, HIDDEN)}
        for layer in range(NUM_LAYERS):
            prefix = f"decoder.layers.{layer}."
            model.update({
                prefix + "input_layernorm.weight": rand(HIDDEN),
                prefix + "self_attention.linear_qkv.weight": rand((NUM_HEADS + 2 * NUM_GROUPS) * HEAD_DIM // TP,
                                                                  HIDDEN),
                prefix + "self_attention.linear_proj.weight": rand(HIDDEN, NUM_HEADS * HEAD_DIM // TP),
                prefix + "pre_mlp_layernorm.weight": rand(HIDDEN),
                prefix + "mlp.linear_fc1.weight": rand(2 * FFN // TP, HIDDEN),
                prefix + "mlp.linear_fc2.weight": rand(HIDDEN, FFN // TP),
            })
        model["decoder.final_layernorm.weight"] = rand(HIDDEN)
        model["output_layer.weight"] = rand(VOCAB // TP, HIDDEN)
        rank_dir = root / "iter_0000001" / f"mp_rank_{tp_rank:02d}"
        rank_dir.mkdir(parents=True)
        torch.save({"model": model, "args": args, "checkpoint_version": 3.0}, rank_dir / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("1")


@pytest.mark.slow
def test_convert_megatron_peak_memory_near_one_layer(tmp_path):
    save_many_layer_megatron(tmp_path / "megatron")
    proc = subprocess.run([sys.executable, str(WORKER), "megatron", str(tmp_path / "megatron"),
                           str(tmp_path / "out"), str(TP)], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = result["peak_bytes"] - result["baseline_bytes"]
    print(f"peak anonymous memory growth {growth / 2**20:.1f} MiB; one layer {LAYER_BYTES / 2**20:.1f} MiB, "
          f"model {MODEL_BYTES / 2**20:.1f} MiB, bound {PEAK_BOUND_BYTES / 2**20:.1f} MiB")
    assert growth <= PEAK_BOUND_BYTES
    assert PEAK_BOUND_BYTES < MODEL_BYTES / 4


@pytest.mark.slow
def test_convert_gguf_peak_memory_near_one_layer(tmp_path):
    config = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=NUM_LAYERS,
                  num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_GROUPS, max_position_embeddings=256,
                  rope_theta=10000.0, rms_norm_eps=1e-5)
    generator = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (NUM_HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (NUM_GROUPS * HEAD_DIM, HIDDEN),
              "self_attn.v_proj": (NUM_GROUPS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, NUM_HEADS * HEAD_DIM),
              "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN),
              "input_layernorm": (HIDDEN,), "post_attention_layernorm": (HIDDEN,)}
    state = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=generator),
             "model.norm.weight": torch.randn(HIDDEN, generator=generator),
             "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=generator)}
    for layer in range(NUM_LAYERS):
        state.update({f"model.layers.{layer}.{name}.weight": torch.randn(shape, generator=generator)
                      for name, shape in shapes.items()})
    # Q8_0 matrices: the file is a quarter of the fp32 model that the conversion writes.
    write_llama_gguf(tmp_path / "model.gguf", state, config, lambda name: GGMLQuantizationType.Q8_0)
    del state
    proc = subprocess.run([sys.executable, str(WORKER), "gguf", str(tmp_path / "model.gguf"), str(tmp_path / "out"),
                           str(TP)], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = result["peak_bytes"] - result["baseline_bytes"]
    print(f"peak anonymous memory growth {growth / 2**20:.1f} MiB; one layer {LAYER_BYTES / 2**20:.1f} MiB, "
          f"model {MODEL_BYTES / 2**20:.1f} MiB, bound {PEAK_BOUND_BYTES / 2**20:.1f} MiB")
    assert growth <= PEAK_BOUND_BYTES
