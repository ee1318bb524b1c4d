"""Configuration dataclasses, loaded once (from a checkpoint, YAML or flags) and never mutated.

Each part of the system receives only the sub-config it needs: the model gets
``ModelConfig``, the KV pool ``CacheConfig``, the scheduler ``SchedulerConfig``.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name (``float32``, ``bfloat16``, ``float16``) to a torch dtype."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    canonical = aliases.get(name, name)
    if canonical not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[canonical]


def dtype_name(dtype: torch.dtype) -> str:
    """Inverse of :func:`parse_dtype`."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


# The keys each RoPE type reads, besides rope_type (as in Hugging Face's rope_parameters).
ROPE_KEYS: dict[str, frozenset[str]] = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "truncate"}),
}
# The MLP activations served, by their Hugging Face names (``hidden_act``).
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a LLaMA-family decoder (the unsharded model)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear"|"llama3", "factor": ..., ...} as in HF configs.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # The MLP is act(gate) * up, with act one of ACTIVATIONS.
    hidden_act: str = "silu"
    # Biases of the fused QKV projection, of the attention output projection, and of the MLP's projections.
    qkv_bias: bool = False
    proj_bias: bool = False
    mlp_bias: bool = False
    # Mistral: a token attends to itself and the sliding_window - 1 tokens before it; None: the whole context.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model config: {key} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})")
        parse_dtype(self.dtype)
        if self.rope_scaling is not None:
            self._check_rope_scaling()
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"model config: hidden_act {self.hidden_act!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        for key in ("qkv_bias", "proj_bias", "mlp_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"model config: {key} must be true or false, got {getattr(self, key)!r}")
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise ValueError(f"model config: sliding_window must be a positive integer or null, got {window!r}")
        for token_id in (*self.eos_token_ids, *(() if self.bos_token_id is None else (self.bos_token_id,))):
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"model config: special token id {token_id} is outside the vocabulary")

    def _check_rope_scaling(self) -> None:
        """Raise ValueError unless rope_scaling names a served type with the keys that type reads."""
        if not isinstance(self.rope_scaling, dict):
            raise ValueError(f"model config: rope_scaling must be a mapping or null, got {self.rope_scaling!r}")
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ROPE_KEYS:
            raise ValueError(f"model config: rope_scaling type {rope_type!r} is not supported "
                             f"(supported: {', '.join(ROPE_KEYS)})")
        unknown = sorted(set(self.rope_scaling) - ROPE_KEYS[rope_type] - {"rope_type"})
        if unknown:
            raise ValueError(f"model config: rope_scaling key {unknown[0]}={self.rope_scaling[unknown[0]]!r} is "
                             f"not supported for rope type {rope_type!r}")
        if rope_type != "default" and not isinstance(self.rope_scaling.get("factor"), (int, float)):
            raise ValueError(f"model config: rope type {rope_type!r} needs a numeric factor, "
                             f"got {self.rope_scaling.get('factor')!r}")
        if rope_type == "yarn" and "original_max_position_embeddings" not in self.rope_scaling:
            raise ValueError("model config: rope type 'yarn' needs original_max_position_embeddings")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def check_tensor_parallel_size(self, tp: int) -> None:
        """Raise ValueError unless the heads split evenly over ``tp`` ranks."""
        if tp <= 0:
            raise ValueError(f"tensor parallel size must be positive, got {tp}")
        if self.num_attention_heads % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            raise ValueError(f"tensor parallel size {tp} and num_kv_heads ({self.num_kv_heads}) must divide "
                             f"one another (KV heads are split, or replicated when tp > num_kv_heads)")
        if self.intermediate_size % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide intermediate_size "
                             f"({self.intermediate_size})")

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rounded up so that every TP rank holds an equal slice."""
        return -(-self.vocab_size // tp) * tp

    def num_kv_heads_per_partition(self, tp: int) -> int:
        """KV heads held by one rank; heads are replicated when tp exceeds num_kv_heads."""
        return max(1, self.num_kv_heads // tp)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"model config: unknown keys {', '.join(unknown)}")
        values = dict(raw)
        values["eos_token_ids"] = tuple(values.get("eos_token_ids", ()))
        try:
            return cls(**values)
        except TypeError as err:
            raise ValueError(f"model config: {err}") from None


def _is_int(value: Any) -> bool:
    """True for an int that is not a bool: YAML's ``true`` must not pass as 1."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CacheConfig:
    """The rBlock KV pool of one instance (per TP rank)."""

    block_size: int = 16
    # Exactly this many blocks, or (when None) as many as fit in kv_cache_memory_gb.
    num_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    # Reuse the KV of full blocks whose tokens (and every token before them) a request shares with an earlier
    # one (megakv.kvcache.prefix_cache); on by default, as in vLLM.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.block_size) or self.block_size <= 0:
            raise ValueError(f"cache config: block_size must be a positive integer, got {self.block_size!r}")
        if self.num_blocks is not None and (not _is_int(self.num_blocks) or self.num_blocks <= 0):
            raise ValueError(f"cache config: num_blocks must be a positive integer, got {self.num_blocks!r}")
        memory = self.kv_cache_memory_gb
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not 0 < memory < math.inf:
            raise ValueError(f"cache config: kv_cache_memory_gb must be a positive finite number, got {memory!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"cache config: enable_prefix_caching must be true or false, got "
                             f"{self.enable_prefix_caching!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits of one engine step."""

    max_num_seqs: int = 64
    # Token budget of one step; a longer prompt is prefilled in chunks of at most this many tokens.
    max_num_batched_tokens: int = 512

    def __post_init__(self) -> None:
        for key in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"scheduler config: {key} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks are arranged: ``num_instances`` serving instances of ``tensor_parallel_size`` ranks."""

    tensor_parallel_size: int = 1
    num_instances: int = 1

    def __post_init__(self) -> None:
        for key in ("tensor_parallel_size", "num_instances"):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"parallel config: {key} must be a positive integer, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.num_instances


# The default recall_after: a tenth of a second, far below a time-to-first-token SLO, far above a step.
RECALL_AFTER_SECONDS = 0.1
# The default --peer-timeout: well above the longest wait a live peer imposes (a remote micro-attention over a long
# context on a busy CPU creditor, a heartbeat thread waiting for the GIL), so that only a dead, hung or cut-off peer
# exceeds it, and short enough that its requests resume within seconds (docs/fault_tolerance.md).
PEER_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class DistKVConfig:
    """How instances lend KV memory to one another (DistKV-LLM section 4.3-4.4)."""

    # Fraction of an instance's pool it may lend to other instances.
    lending_cap: float = 1.0
    # DGFM: blocks moved home per step, at most.
    max_moves_per_step: int = 8
    # Seconds the front lets pass with unfinished requests, every instance holding them waiting and no message
    # moving, before it declares the cluster stalled and stops.
    stall_timeout: float = 60.0
    # Seconds a request that fits its own instance's pool may wait for room while blocks of that pool are lent,
    # before the instance recalls them (the request that borrowed them is preempted, once at most); inf: never.
    recall_after: float = RECALL_AFTER_SECONDS
    # Seconds another instance may leave a wait on it unanswered (a remote micro-attention, a block copy, its
    # heartbeat) before it is declared failed and the cluster goes on without it.
    peer_timeout: float = PEER_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        cap = self.lending_cap
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0.0 <= cap <= 1.0:
            raise ValueError(f"distkv config: lending_cap must be between 0 and 1, got {cap!r}")
        if not _is_int(self.max_moves_per_step) or self.max_moves_per_step < 0:
            raise ValueError(f"distkv config: max_moves_per_step must be an integer >= 0, "
                             f"got {self.max_moves_per_step!r}")
        timeout = self.stall_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"distkv config: stall_timeout must be a number of seconds > 0, got {timeout!r}")
        recall = self.recall_after
        if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not recall >= 0:
            raise ValueError(f"distkv config: recall_after must be a number of seconds >= 0 (inf: never), "
                             f"got {recall!r}")
        timeout = self.peer_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"distkv config: peer_timeout must be a finite number of seconds > 0, got {timeout!r}")


# uvicorn's log levels, from the quietest.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# One label of a host name (RFC 1123): letters, digits and hyphens, no hyphen at either end.
HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_host(host: str) -> bool:
    """True for an IPv4 or IPv6 address, or a host name; a dotted quad out of range is neither."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        return False
    return len(host) <= 253 and all(HOST_LABEL.fullmatch(label) for label in labels)


@dataclass(frozen=True)
class ServerConfig:
    """Where ``megakv serve`` listens, and the model name its API answers to."""

    host: str = "127.0.0.1"
    # 0: any free port (the startup log names the one taken).
    port: int = 8000
    # The ``model`` requests must name; None: the checkpoint path as given.
    served_model_name: str | None = None
    log_level: str = "info"
    # What one HTTP request may ask for: larger ones get a 413 or 400 before any of their work starts.
    max_request_bytes: int = 32 * 2**20
    max_prompts_per_request: int = 4096
    # Prompts x n: each choice is one engine request.
    max_choices_per_request: int = 4096
    # Prompt tokens plus max_tokens, summed over the request's choices.
    max_request_tokens: int = 4 * 2**20

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not is_host(self.host):
            raise ValueError(f"server config: host must be an IP address or a host name (127.0.0.1, 0.0.0.0, ::, "
                             f"localhost, node1.example.com, ...), got {self.host!r}")
        if not _is_int(self.port) or not 0 <= self.port <= 65535:
            raise ValueError(f"server config: port must be an integer from 0 to 65535 (0: any free port), "
                             f"got {self.port!r}")
        name = self.served_model_name
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"server config: served_model_name must be a non-empty string, got {name!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"server config: log_level must be one of {', '.join(LOG_LEVELS)}, "
                             f"got {self.log_level!r}")
        for key in ("max_request_bytes", "max_prompts_per_request", "max_choices_per_request",
                    "max_request_tokens"):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"server config: {key} must be a positive integer, got {value!r}")

    @property
    def request_limits(self) -> RequestLimits:
        """The bounds the API handlers check."""
        return RequestLimits(self.max_request_bytes, self.max_prompts_per_request, self.max_choices_per_request,
                             self.max_request_tokens)


@dataclass(frozen=True)
class RequestLimits:
    """What one HTTP request may ask for (see ServerConfig)."""

    max_bytes: int
    max_prompts: int
    max_choices: int
    max_tokens: int


@dataclass(frozen=True)
class EngineConfig:
    """Everything the serving engine needs besides the model weights."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    distkv: DistKVConfig = field(default_factory=DistKVConfig)


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file into a flat dict of option names (as the CLI spells them, with _)."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as err:
        raise ValueError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.MarkedYAMLError as err:
        # PyYAML's own message spans several lines (context, snippet, caret): keep the place and the problem.
        mark = err.problem_mark
        place = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        raise ValueError(f"config file {place}: not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}
