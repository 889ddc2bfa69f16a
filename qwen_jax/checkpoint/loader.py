"""Place checkpoint tensors onto devices, tensor by tensor, each device reading only the slice it owns."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from qwen_jax import sharding as sharding_lib
from qwen_jax.checkpoint import layout
from qwen_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint
from qwen_jax.config import QwenConfig
from qwen_jax.model import abstract_params


def check_tensor_names(ckpt: SafetensorsCheckpoint, expected: set[str]) -> None:
    present = set(ckpt.tensors)
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing:
        raise CheckpointError(f"{ckpt.directory}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:5]}")
    if unexpected:
        raise CheckpointError(f"{ckpt.directory}: {len(unexpected)} unexpected tensor(s) for this config.json, "
                              f"e.g. {unexpected[:5]}")


def load_params(directory: str | Path, config: QwenConfig, dtype, mesh: Mesh, rules: sharding_lib.Rules,
                quant_group: int | None = None) -> dict:
    """Read every parameter of the checkpoint in `directory` onto `mesh` following the logical `rules`.

    Everything is validated (names, shapes, dtypes, file sizes) before the first weight is read.
    """
    ckpt = SafetensorsCheckpoint(directory)
    check_tensor_names(ckpt, layout.expected_float_tensors(config))
    sources = layout.float_sources(ckpt, config)
    abstract = abstract_params(config, dtype, quant_group)
    placements = traverse_util.flatten_dict(sharding_lib.shardings(abstract, mesh, rules))
    flat_abstract = traverse_util.flatten_dict(nn.unbox(abstract))
    if set(flat_abstract) != set(sources):
        raise AssertionError(f"layout and model disagree: {set(flat_abstract) ^ set(sources)}")
    params = {}
    for path, spec in flat_abstract.items():
        source = sources[path]
        if tuple(source.shape) != tuple(spec.shape):
            raise CheckpointError(f"{directory}: parameter {'/'.join(path)}: source shape {source.shape}, "
                                  f"expected {spec.shape}")
        params[path] = _place(source, spec.shape, spec.dtype, placements[path])
    return traverse_util.unflatten_dict(params)


def _place(source: layout.LazyArray, shape, dtype, sharding) -> jax.Array:
    # One callback per device-owned slice: the host reads only bytes some device keeps. Devices holding the same
    # slice (replicated axes) share one read.
    read_once: dict[tuple, np.ndarray] = {}

    def read(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in read_once:
            read_once[key] = np.ascontiguousarray(source[index]).astype(dtype)
        return read_once[key]

    return jax.make_array_from_callback(tuple(shape), sharding, read)
