"""Tests of the streaming safetensors writer against the safetensors library's own reader."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megakv.checkpoint.safetensors_writer import SafetensorsWriter


def sample_tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(5, 3, generator=generator).to(dtype),
        "a.bias": torch.randn(7, generator=generator).to(dtype),
        # Non-contiguous input must be written in logical order.
        "c.weight": torch.randn(4, 6, generator=generator).to(dtype).t(),
        "scalar": torch.tensor(1.5, dtype=dtype),
    }


def plan_of(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_writer_round_trips_through_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = sample_tensors(dtype)
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, plan_of(tensors), metadata={"format": "pt"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype
        assert torch.equal(loaded[name], tensor), name
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("c.weight"), tensors["c.weight"])
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_length % 8 == 0


def test_writer_mixed_dtypes_and_empty_plan(tmp_path: Path) -> None:
    tensors = {"f": torch.ones(3), "h": torch.ones(2, dtype=torch.bfloat16), "i": torch.arange(4)}
    with SafetensorsWriter(tmp_path / "mixed.safetensors", plan_of(tensors)) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    loaded = load_file(tmp_path / "mixed.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    with SafetensorsWriter(tmp_path / "empty.safetensors", []):
        pass
    assert load_file(tmp_path / "empty.safetensors") == {}


def test_writer_rejects_out_of_order_tensor(tmp_path: Path) -> None:
    tensors = sample_tensors(torch.float32)
    writer = SafetensorsWriter(tmp_path / "x.safetensors", plan_of(tensors))
    with pytest.raises(ValueError, match="expected tensor 'b.weight' next, got 'a.bias'"):
        writer.write("a.bias", tensors["a.bias"])
    writer.abort()


def test_writer_rejects_wrong_shape_and_dtype(tmp_path: Path) -> None:
    tensors = sample_tensors(torch.float32)
    writer = SafetensorsWriter(tmp_path / "x.safetensors", plan_of(tensors))
    with pytest.raises(ValueError, match=r"'b.weight' has shape \(3, 5\), planned \(5, 3\)"):
        writer.write("b.weight", tensors["b.weight"].t())
    with pytest.raises(ValueError, match="has dtype torch.float16, planned torch.float32"):
        writer.write("b.weight", tensors["b.weight"].half())
    writer.abort()


def test_writer_rejects_unplanned_extra_tensor(tmp_path: Path) -> None:
    with SafetensorsWriter(tmp_path / "x.safetensors", [("a", (1,), torch.float32)]) as writer:
        writer.write("a", torch.zeros(1))
        with pytest.raises(ValueError, match="was not planned"):
            writer.write("b", torch.zeros(1))


def test_writer_close_reports_incomplete_file(tmp_path: Path) -> None:
    tensors = sample_tensors(torch.float32)
    writer = SafetensorsWriter(tmp_path / "x.safetensors", plan_of(tensors))
    writer.write("b.weight", tensors["b.weight"])
    with pytest.raises(RuntimeError, match="incomplete: 3 planned tensors were not written, starting with 'a.bias'"):
        writer.close()


def test_writer_rejects_duplicate_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="planned twice"):
        SafetensorsWriter(tmp_path / "x.safetensors", [("a", (1,), torch.float32), ("a", (2,), torch.float32)])
