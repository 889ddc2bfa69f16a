"""Read HF safetensors checkpoints lazily: headers parsed up front, tensors memory-mapped on demand.

We parse the (tiny, documented) safetensors header ourselves instead of using `safetensors.safe_open`: its NumPy
backend cannot return bfloat16 tensors, and reading the header lets us check every shard (truncation, offsets)
before a single weight is read. Tensors come back as read-only `np.memmap` views: slicing one reads only the
pages of that slice, so host memory stays near the slice being placed, never the model.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file or tensor that is missing, malformed or inconsistent; the message names it."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one shard's header and check that every tensor's bytes lie inside the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if 8 + header_len > size:
            raise CheckpointError(f"{file}: truncated safetensors file: header of {header_len} bytes, file of {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: malformed safetensors header ({e})") from None
    data_start = 8 + header_len
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[meta["dtype"]])
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: tensor {name}: malformed header entry {meta!r} ({e!r})") from None
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{file}: tensor {name}: {end - begin} bytes for shape {list(shape)} {meta['dtype']}, expected {expected}")
        if data_start + end > size:
            raise CheckpointError(
                f"{file}: truncated: tensor {name} needs bytes up to {data_start + end}, the file has {size}")
        tensors[name] = TensorInfo(file, dtype, shape, data_start + begin)
    return tensors


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory (sharded with an index json, or one model.safetensors)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed shard index ({e!r})") from None
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{self.directory}: no {INDEX_FILE} and no {SINGLE_FILE}")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            file = self.directory / name
            if not file.is_file():
                raise CheckpointError(f"{file}: shard listed in {INDEX_FILE} is missing")
            self.tensors.update(read_header(file))
        for name, shard in (weight_map or {}).items():
            if name not in self.tensors:
                raise CheckpointError(f"{self.directory / shard}: tensor {name} listed in {INDEX_FILE} is not in the shard")
            if self.tensors[name].file.name != shard:
                raise CheckpointError(
                    f"{INDEX_FILE}: tensor {name} is mapped to {shard} but stored in {self.tensors[name].file.name}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: tensor {name} is missing from the checkpoint") from None

    def get(self, name: str, shape: tuple[int, ...] | None = None, dtypes: tuple | None = None) -> np.ndarray:
        """A read-only memory map of tensor `name`, checked against the expected shape and dtypes."""
        info = self.info(name)
        if shape is not None and info.shape != tuple(shape):
            raise CheckpointError(
                f"{info.file}: tensor {name} has shape {list(info.shape)}, expected {list(shape)} (from config.json)")
        if dtypes is not None and info.dtype not in [np.dtype(d) for d in dtypes]:
            raise CheckpointError(
                f"{info.file}: tensor {name} has dtype {info.dtype}, expected one of {[np.dtype(d).name for d in dtypes]}")
        return np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape)
