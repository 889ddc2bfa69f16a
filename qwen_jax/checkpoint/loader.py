"""Place checkpoint tensors onto devices, tensor by tensor, each device reading only the slice it owns."""

from __future__ import annotations

import gc
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from qwen_jax import sharding as sharding_lib
from qwen_jax.checkpoint import gptq, layout
from qwen_jax.checkpoint.layout import LazyArray, ParamPath
from qwen_jax.checkpoint.pieces import ModelParams, cast
from qwen_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint
from qwen_jax.config import QwenConfig
from qwen_jax.model import abstract_params


def check_tensor_names(ckpt: SafetensorsCheckpoint, expected: set[str], optional: set[str] = frozenset()) -> None:
    present = set(ckpt.tensors)
    missing, unexpected = sorted(expected - present), sorted(present - expected - optional)
    if missing:
        raise CheckpointError(f"{ckpt.directory}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:5]}")
    if unexpected:
        raise CheckpointError(f"{ckpt.directory}: {len(unexpected)} unexpected tensor(s) for this config.json, "
                              f"e.g. {unexpected[:5]}")


def open_checkpoint(directory: str | Path, config: QwenConfig) -> tuple[dict[ParamPath, LazyArray], int | None]:
    """Lazy sources of every parameter of a float or GPTQ Int8 checkpoint, and its group size (None: float).

    Everything is checked here, before the first weight is read: names, shapes, dtypes, file sizes, the
    quantization settings and the GPTQ values the int8 layout relies on.
    """
    gptq_config = gptq.read_gptq_config(directory, config)
    ckpt = SafetensorsCheckpoint(directory)
    if gptq_config is None:
        check_tensor_names(ckpt, layout.expected_float_tensors(config))
        return layout.float_sources(ckpt, config), None
    group = gptq_config.group_size
    check_tensor_names(ckpt, *gptq.expected_tensors(config))
    sources = gptq.gptq_sources(ckpt, config, group)
    gptq.check_values(ckpt, config, group)
    return sources, group


def check_sources(directory: str | Path, sources: dict[ParamPath, LazyArray],
                  specs: dict[ParamPath, jax.ShapeDtypeStruct]) -> None:
    """Check that `sources` provides exactly the pieces `specs` (pieces.checkpoint_specs) describes, shape for shape."""
    if set(specs) != set(sources):
        raise AssertionError(f"layout and model disagree: {sorted(set(specs) ^ set(sources))[:5]}")
    for path, spec in specs.items():
        if tuple(sources[path].shape) != tuple(spec.shape):
            raise CheckpointError(f"{directory}: parameter {'/'.join(path)}: source shape {sources[path].shape}, "
                                  f"expected {spec.shape}")


def load_params(directory: str | Path, config: QwenConfig, dtype, mesh: Mesh,
                strategy: str | sharding_lib.Rules) -> tuple[dict, int | None]:
    """Read every parameter of the checkpoint in `directory` onto `mesh`, placed by `strategy`.

    Returns the parameters and the int8 group size (None for a float checkpoint). Float weights are cast to
    `dtype`; GPTQ weights stay int8 values with float16 scales.
    """
    sources, group = open_checkpoint(directory, config)
    params = ModelParams(abstract_params(config, dtype, group), mesh, strategy)
    pieces = params.pieces()
    check_sources(directory, sources, {piece: spec for piece, (spec, _) in pieces.items()})
    for piece, (spec, sharding) in pieces.items():
        # popped: once placed, a source's memory map (and the pages it touched) is released.
        params.put(piece, place(sources.pop(piece), spec.shape, spec.dtype, sharding))
    return params.tree(), group


def place(source: LazyArray, shape, dtype, sharding) -> jax.Array:
    """One device array of `shape` from a lazy source, built from the slices its devices own, then cast to `dtype`."""
    # jax lets go of the host buffers of finished transfers (and of dead CPU arrays that adopted them) only from a
    # gc callback (jax-ml/jax#14882); a young-generation collection makes that happen now, so host memory holds
    # about one tensor, not every tensor placed since Python last collected.
    gc.collect(0)
    # One callback per device-owned slice: the host reads only bytes some device keeps. Devices holding the same
    # slice (replicated axes) share one read. One host copy per slice, in the source dtype: the cast runs on the
    # devices, several times faster than NumPy's float16 -> bfloat16 and no wider in host memory.
    read_once: dict[tuple, np.ndarray] = {}

    def read(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in read_once:
            read_once[key] = _aligned_copy(source[index])
        return read_once[key]

    return cast(jax.make_array_from_callback(tuple(shape), sharding, read), dtype)


def _aligned_copy(array: np.ndarray, alignment: int = 64) -> np.ndarray:
    """A C-contiguous copy of `array` starting on an `alignment`-byte boundary.

    XLA's CPU client adopts such a buffer as the device array instead of copying it, so on the CPU (the converter,
    CPU inference) a tensor is held once, not twice, while it is placed.
    """
    array = np.asarray(array)
    buffer = np.empty(array.nbytes + alignment, np.uint8)
    start = -buffer.ctypes.data % alignment
    out = buffer[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    np.copyto(out, array)
    return out
