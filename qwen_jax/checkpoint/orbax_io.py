"""Converted checkpoints: the device layout stored with orbax-checkpoint, restored straight into any sharding.

    DST/config.json, generation_config.json, qwen.tiktoken, quantize_config.json   copied from the source
    DST/params/<module>/        one orbax checkpoint per module: wte, h_0 … h_{L-1}, ln_f, lm_head
    DST/qwen_jax_checkpoint.json   written last: format, int8 group size, stored dtypes, every other file's size

One orbax checkpoint per module (a layer, as the checkpoints store them: qwen_jax.checkpoint.pieces), not one for
the model, because orbax saves a pytree that is in memory: per module a converter holds one layer, not 76 GB.
Arrays are stored in the source dtypes (int8 values, float16 scales and float tensors), restored as stored and
cast on the devices, so a converted model is bit-identical to loading the source. A directory without the marker
is an interrupted conversion and is refused; so is one whose files differ from the marker's list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import Mesh

from qwen_jax import sharding as sharding_lib
from qwen_jax.checkpoint.layout import ParamPath
from qwen_jax.checkpoint.pieces import ModelParams
from qwen_jax.checkpoint.safetensors_io import CheckpointError
from qwen_jax.config import QwenConfig
from qwen_jax.model import abstract_params

MARKER = "qwen_jax_checkpoint.json"
PARAMS = "params"
FORMAT = "qwen_jax-orbax"
VERSION = 1
# Storage chunks: compressed (and restored) one at a time and in parallel, so a 2.5 GB embedding is written without a
# second 2.5 GB buffer and read on several threads.
CHUNK_BYTES = 64 * 2**20


def is_converted(directory: Path) -> bool:
    """Whether `directory` is (or was meant to become) a converted checkpoint, complete or not."""
    return (directory / MARKER).exists() or (directory / PARAMS).is_dir()


def group_by_module(paths: Iterable[ParamPath]) -> dict[str, list[ParamPath]]:
    """Piece paths grouped by module (`h_3`, `wte`: one orbax checkpoint each), in checkpoint order."""
    groups: dict[str, list[ParamPath]] = {}
    for path in paths:
        groups.setdefault(path[0], []).append(path)
    return groups


class ModuleWriter:
    """Saves one orbax checkpoint per module under `directory`/params.

    Saving is asynchronous: a module is written while the caller reads the next one. Orbax writes from a host
    snapshot of the arrays, so host memory holds up to three modules (the next, the one written, its snapshot).
    """

    def __init__(self, directory: Path):
        self.root = Path(directory) / PARAMS
        self._checkpointer = ocp.StandardCheckpointer()

    def write(self, module: str, arrays: dict[ParamPath, jax.Array]) -> None:
        """`arrays`: full parameter paths (all starting with `module`) -> arrays."""
        tree = traverse_util.unflatten_dict({path[1:]: array for path, array in arrays.items()})
        save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)
        self._checkpointer.wait_until_finished()
        self._checkpointer.save(self.root / module, tree, save_args=save_args)

    def close(self) -> None:
        self._checkpointer.wait_until_finished()
        self._checkpointer.close()


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MARKER}


def write_marker(directory: Path, quant_group: int | None, source: str, dtypes: dict[ParamPath, np.dtype]) -> None:
    """Declare `directory` complete: call it after every other file is written (and before it is renamed).

    `dtypes`: the stored dtype of every parameter."""
    marker = {"format": FORMAT, "version": VERSION, "quant_group": quant_group, "source": source,
              "dtypes": {"/".join(path): np.dtype(dtype).name for path, dtype in dtypes.items()},
              "files": _files(directory)}
    with open(directory / MARKER, "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_marker(directory: Path) -> dict:
    """The marker of a converted checkpoint, after checking that every file it lists is there, size for size."""
    path = directory / MARKER
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MARKER}: an incomplete (interrupted?) qwen_jax conversion; "
                              f"delete it and convert again")
    try:
        marker = json.loads(path.read_text())
        files, group = dict(marker["files"]), marker["quant_group"]
        marker["dtypes"] = {name: jnp.dtype(d) for name, d in marker["dtypes"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed marker ({e!r})") from None
    if marker.get("format") != FORMAT or marker.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {marker.get('format')!r} version {marker.get('version')!r}, "
                              f"expected {FORMAT!r} version {VERSION}")
    for name, size in files.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the converted checkpoint (listed in {MARKER})")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, {MARKER} says {size}")
    if group is not None and not isinstance(group, int):
        raise CheckpointError(f"{path}: quant_group must be an integer or null, got {group!r}")
    return marker


def restore_params(directory: Path, config: QwenConfig, dtype, mesh: Mesh, strategy: str | sharding_lib.Rules,
                   marker: dict) -> dict:
    """Every parameter, module by module, restored into the shardings that `strategy` gives on `mesh` (floats cast
    to `dtype` on the devices); each device reads only what it keeps."""
    params = ModelParams(abstract_params(config, dtype, marker["quant_group"]), mesh, strategy)
    pieces = params.pieces()
    stored = {piece: marker["dtypes"].get("/".join(piece)) for piece in pieces}
    missing = [piece for piece, d in stored.items() if d is None]
    if missing:
        raise CheckpointError(f"{directory / MARKER}: no stored dtype for parameters {missing[:5]}: it does not "
                              f"match config.json")
    with ocp.StandardCheckpointer() as checkpointer:
        for module, paths in group_by_module(pieces).items():
            target = traverse_util.unflatten_dict({
                path[1:]: jax.ShapeDtypeStruct(pieces[path][0].shape, stored[path], sharding=pieces[path][1])
                for path in paths})
            try:
                restored = checkpointer.restore(directory / PARAMS / module, target)
            except (ValueError, FileNotFoundError) as e:
                raise CheckpointError(f"{directory / PARAMS / module}: cannot restore module {module} "
                                      f"for this config.json ({e})") from None
            for path, array in traverse_util.flatten_dict(restored).items():
                params.put((module, *path), array)
    return params.tree()
