"""The YAML configs of configs/ load as megakv serve reads them (no weights needed), and bad settings are refused
naming the key and the values it allows."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from megakv.cli import build_parser
from megakv.config import EngineConfig, ModelConfig, ServerConfig
from megakv.kvcache.kv_cache import KVCache
from megakv.options import complete_from_config, engine_config, resolve_options, server_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Hugging Face's config.json of each LLaMA-2 size.
LLAMA2 = {
    "7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_attention_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096,
                      dtype="float16"),
    "13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                       num_attention_heads=40, num_kv_heads=40, head_dim=128, max_position_embeddings=4096,
                       dtype="float16"),
    "70b": ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                       num_attention_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=4096,
                       dtype="float16"),
}
# The GPUs the LLaMA configs are sized for (A100/H100 80 GB), and what a rank needs besides weights and KV pool.
GPU_BYTES = 80 * 10**9
WORKSPACE_BYTES = 4 * 2**30


def load(*argv: str) -> tuple[EngineConfig, ServerConfig]:
    """The engine's and the server's configs as megakv serve resolves them from these arguments."""
    options = resolve_options(complete_from_config(build_parser().parse_args(["serve", *argv])))
    return engine_config(options), server_config(options)


def num_parameters(model: ModelConfig) -> int:
    """Parameters of a LLaMA decoder with untied embeddings."""
    kv_width = model.num_kv_heads * model.head_dim
    per_layer = 2 * model.hidden_size * model.hidden_size + 2 * model.hidden_size * kv_width \
        + 3 * model.hidden_size * model.intermediate_size + 2 * model.hidden_size
    return model.num_layers * per_layer + 2 * model.vocab_size * model.hidden_size + model.hidden_size


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("llama2-*.yaml")), ids=lambda path: path.stem)
def test_llama2_config_loads_and_its_pool_fits_an_80gb_gpu(path):
    size, instances, tp = re.fullmatch(r"llama2-(\d+b)-(\d+)x(\d+)", path.stem).groups()
    config, server = load("--config", str(path))
    parallel = config.parallel
    assert (parallel.num_instances, parallel.tensor_parallel_size) == (int(instances), int(tp))
    model = LLAMA2[size]
    model.check_tensor_parallel_size(parallel.tensor_parallel_size)
    dtype = torch.float16
    num_blocks = KVCache.num_blocks_for(model, parallel.tensor_parallel_size, config.cache, dtype)
    pool_bytes = num_blocks * KVCache.bytes_per_block(model, parallel.tensor_parallel_size, config.cache.block_size,
                                                      dtype)
    weight_bytes = num_parameters(model) * 2 // parallel.tensor_parallel_size
    assert weight_bytes + pool_bytes + WORKSPACE_BYTES <= GPU_BYTES
    # A pool holds several requests of the model's longest context.
    assert num_blocks * config.cache.block_size >= 8 * model.max_position_embeddings
    assert 0 < config.distkv.lending_cap < 1 and config.distkv.max_moves_per_step > 0
    assert (server.host, server.port, server.served_model_name) == ("0.0.0.0", 8000, f"llama-2-{size}")


def test_demo_config_is_a_small_cluster_of_the_demo_model():
    config, server = load("--config", str(CONFIGS / "demo.yaml"))
    assert (config.parallel.num_instances, config.parallel.tensor_parallel_size) == (3, 1)
    # The pass-key chat of demo_prompts.jsonl (654 tokens) outgrows one pool, not the cluster's.
    pool_tokens = config.cache.num_blocks * config.cache.block_size
    assert pool_tokens < 654 < 3 * pool_tokens
    assert (server.host, server.port) == ("127.0.0.1", 8000)


def test_flags_win_over_the_config_file():
    config, server = load("--config", str(CONFIGS / "llama2-7b-8x1.yaml"), "--port", "9000", "--host",
                             "127.0.0.1", "--instances", "4")
    assert (server.host, server.port, config.parallel.num_instances) == ("127.0.0.1", 9000, 4)


@pytest.mark.parametrize("text,message", [
    ("port: 70000", "port must be an integer from 0 to 65535 (0: any free port), got 70000"),
    ("port: -1", "port must be an integer from 0 to 65535"),
    ("port: '8000'", "port must be an integer from 0 to 65535 (0: any free port), got '8000'"),
    ("port: true", "port must be an integer from 0 to 65535"),
    ("host: 999.1.1.1", "host must be an IP address or a host name (127.0.0.1, 0.0.0.0, ::, localhost"),
    ("host: bad host", "host must be an IP address or a host name"),
    ("host: 8000", "host must be an IP address or a host name"),
    ("host: ''", "host must be an IP address or a host name"),
    ("log_level: loud", "log_level must be one of critical, error, warning, info, debug, got 'loud'"),
    ("served_model_name: ''", "served_model_name must be a non-empty string, got ''"),
    ("served_model_name: [a, b]", "served_model_name must be a non-empty string"),
    ("prot: 8000", "unknown option(s) prot (known: block_size, dtype, enable_prefix_caching, host,"),
    ("lending_cap: 2", "lending_cap must be between 0 and 1, got 2"),
    ("max_moves_per_step: -1", "max_moves_per_step must be an integer >= 0, got -1"),
    ("stall_timeout: 0", "stall_timeout must be a number of seconds > 0, got 0"),
    ("stall_timeout: soon", "stall_timeout must be a number of seconds > 0, got 'soon'"),
    ("recall_after: -1", "recall_after must be a number of seconds >= 0 (inf: never), got -1"),
    ("recall_after: never", "recall_after must be a number of seconds >= 0 (inf: never), got 'never'"),
    ("recall_after: .nan", "recall_after must be a number of seconds >= 0 (inf: never), got nan"),
])
def test_config_server_setting_errors_name_the_key_and_allowed_values(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"model: ckpt\n{text}\n")
    with pytest.raises(ValueError) as error:
        load("--config", str(path))
    assert message in str(error.value)


@pytest.mark.parametrize("flags,message", [
    (["--port", "65536"], "port must be an integer from 0 to 65535"),
    (["--host", "node_1"], "host must be an IP address or a host name"),
    (["--log-level", "verbose"], "log_level must be one of critical, error, warning, info, debug"),
])
def test_server_flag_errors_name_the_key_and_allowed_values(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load("--model", "ckpt", *flags)


def test_recall_after_defaults_to_a_tenth_of_a_second_and_inf_turns_recalls_off(tmp_path):
    assert load("--model", "ckpt")[0].distkv.recall_after == 0.1
    assert load("--model", "ckpt", "--recall-after", "inf")[0].distkv.recall_after == float("inf")
    path = tmp_path / "never.yaml"
    path.write_text("model: ckpt\nrecall_after: .inf\n")
    assert load("--config", str(path))[0].distkv.recall_after == float("inf")
