"""mpirun worker: train a Hugging Face LLaMA one step with DeepSpeed (ZeRO stage S, gloo), save, record logits.

    mpirun -n 2 python deepspeed_fixture_worker.py OUT_DIR PROMPT_JSON STAGE

Writes ``OUT_DIR/ckpt`` (``engine.save_checkpoint``: ``latest``, ``global_step1/...``,
and the model's ``config.json`` at the root) and ``OUT_DIR/logits.pt``: the logits of
DeepSpeed's trained module over the prompt, in fp32, and ``OUT_DIR/greedy.json``: the
tokens its greedy decoding appends to the prompt.
"""
import json
import sys
from pathlib import Path

import torch

# Dimensions that catch layout bugs: 4 queries per KV head, ffn != hidden, untied embeddings, odd vocabulary.
MODEL = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
             num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=128,
             initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)

NUM_GREEDY_TOKENS = 6  # as tests/checkpoint/conftest.py


def main(out_dir: str, prompt_json: str, stage: str) -> None:
    import importlib

    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from megakv.parallel import state

    # The JIT shared-memory all-reduce op crashes on this CPU setup, and building it takes 45 s; gloo is enough
    # (shared/CHECKPOINTS.md). By name: the attribute deepspeed.comm.torch is the torch package itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    env = state.init_distributed()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": int(stage)}, "zero_allow_untested_optimizer": True}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    # One training step, so the saved weights are DeepSpeed's updated ones rather than the initial ones.
    tokens = torch.randint(0, MODEL["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(env.rank))
    loss = engine(input_ids=tokens, labels=tokens).loss
    engine.backward(loss)
    engine.step()
    root = Path(out_dir) / "ckpt"
    engine.save_checkpoint(str(root))
    # Every rank runs the forward passes: under ZeRO-3 each one gathers parameters from all ranks.
    prompt = json.loads(Path(prompt_json).read_text())
    with torch.no_grad():
        logits = engine.module(torch.tensor([prompt])).logits[0]
        greedy = list(prompt)
        for _ in range(NUM_GREEDY_TOKENS):
            greedy.append(int(engine.module(torch.tensor([greedy])).logits[0, -1].argmax()))
    if env.rank == 0:
        model.config.save_pretrained(root)
        torch.save(logits.float().clone(), Path(out_dir) / "logits.pt")
        (Path(out_dir) / "greedy.json").write_text(json.dumps(greedy[len(prompt):]))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
