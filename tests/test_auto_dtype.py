"""--dtype auto: the checkpoint's dtype, but bf16 for an fp32 checkpoint on a CPU with bf16 arithmetic."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megakv import startup
from megakv.options import DEFAULTS, engine_config
from megakv.startup import auto_dtype, open_checkpoint, run_dtype

AVX512 = frozenset({"avx2", "avx512f", "avx512bw"})


def checkpoint_in(dtype: torch.dtype) -> SimpleNamespace:
    return SimpleNamespace(model=SimpleNamespace(torch_dtype=dtype))


@pytest.mark.parametrize("flags,checkpoint,device,expected", [
    (AVX512 | {"avx512_bf16"}, torch.float32, "cpu", torch.bfloat16),
    (AVX512 | {"amx_bf16"}, torch.float32, "cpu", torch.bfloat16),
    (AVX512, torch.float32, "cpu", torch.float32),
    (AVX512 | {"avx512_bf16"}, torch.bfloat16, "cpu", torch.bfloat16),
    (AVX512, torch.bfloat16, "cpu", torch.bfloat16),
    # bf16 would drop fp16's mantissa bits.
    (AVX512 | {"avx512_bf16"}, torch.float16, "cpu", torch.float16),
    (AVX512 | {"avx512_bf16"}, torch.float32, "cuda", torch.float32),
])
def test_auto_dtype_rule(monkeypatch, flags, checkpoint, device, expected):
    monkeypatch.setattr(startup, "cpu_flags", lambda: flags)
    assert auto_dtype(checkpoint_in(checkpoint), torch.device(device)) == expected


def test_an_explicit_dtype_wins_over_auto(monkeypatch):
    monkeypatch.setattr(startup, "cpu_flags", lambda: AVX512 | {"avx512_bf16"})
    assert run_dtype(torch.float32, checkpoint_in(torch.float32), torch.device("cpu")) == torch.float32
    assert run_dtype(None, checkpoint_in(torch.float32), torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("option,expected", [(None, None), ("auto", None), ("bf16", torch.bfloat16),
                                             ("float32", torch.float32)])
def test_open_checkpoint_reads_the_dtype_option(megakv_checkpoint, option, expected):
    options = dict(DEFAULTS, dtype=option)
    _, requested = open_checkpoint(str(megakv_checkpoint("gqa", 1)), options, engine_config(options))
    assert requested == expected


def test_open_checkpoint_names_an_unknown_dtype(megakv_checkpoint):
    options = dict(DEFAULTS, dtype="float8")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        open_checkpoint(str(megakv_checkpoint("gqa", 1)), options, engine_config(options))
