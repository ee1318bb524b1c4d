"""A streaming safetensors writer: plan every tensor up front, then write them one at a time.

The header of a safetensors file lists every tensor's byte range, so a normal
writer needs all tensors in memory at once. Knowing names, shapes and dtypes in
advance is enough to write the header first; a converter can then stream one
layer at a time. The layout matches the reference implementation
(huggingface/safetensors): an 8-byte little-endian header length, a JSON header
padded with spaces to a multiple of 8 bytes, then the raw little-endian data.
"""
from __future__ import annotations

import json
import math
import os
import struct
from types import TracebackType

import torch

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

TensorPlan = tuple[str, tuple[int, ...], torch.dtype]


class SafetensorsWriter:
    """Writes a safetensors file whose tensors arrive one at a time, in planned order."""

    def __init__(self, path: str | os.PathLike, plan: list[TensorPlan],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = os.fspath(path)
        self._plan = [(name, tuple(shape), dtype) for name, shape, dtype in plan]
        names = [name for name, _, _ in self._plan]
        if len(set(names)) != len(names):
            duplicate = next(name for name in names if names.count(name) > 1)
            raise ValueError(f"tensor {duplicate!r} is planned twice")
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        for name, shape, dtype in self._plan:
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            num_bytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + num_bytes]}
            offset += num_bytes
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)
        self._num_written = 0
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(header_bytes)))
        self._file.write(header_bytes)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor; its name, shape and dtype must match the plan."""
        if self._file.closed:
            raise RuntimeError(f"safetensors file {self.path} is already closed")
        if self._num_written == len(self._plan):
            raise ValueError(f"tensor {name!r} was not planned for {self.path}: every planned tensor is written")
        expected_name, expected_shape, expected_dtype = self._plan[self._num_written]
        if name != expected_name:
            raise ValueError(f"{self.path}: expected tensor {expected_name!r} next, got {name!r}")
        if tuple(tensor.shape) != expected_shape:
            raise ValueError(f"{self.path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"planned {expected_shape}")
        if tensor.dtype != expected_dtype:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {tensor.dtype}, planned {expected_dtype}")
        # Reinterpret as bytes (works for bfloat16, which numpy lacks); reshape first so 0-d tensors view too.
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(raw.numpy().data)
        self._num_written += 1

    def close(self) -> None:
        """Close the file; raise RuntimeError if a planned tensor was never written."""
        if self._file.closed:
            return
        self._file.close()
        if self._num_written < len(self._plan):
            missing = self._plan[self._num_written][0]
            raise RuntimeError(f"safetensors file {self.path} is incomplete: "
                               f"{len(self._plan) - self._num_written} planned tensors were not written, "
                               f"starting with {missing!r}")

    def abort(self) -> None:
        """Close the file without checking it is complete (the caller discards it)."""
        self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
