"""Offline converter: a Qwen (v1) checkpoint (GPTQ Int8 as published, or float) -> qwen_jax's orbax layout.

`python -m convert SRC DST` (or `qwen-jax-convert`). The output holds the device layout that qwen_jax.load
would otherwise rebuild from the source on every load (int8 unpacking, reshapes, transposes), stored with
orbax-checkpoint, so `qwen_jax.load(DST, mesh=..., strategy=...)` restores it straight into any sharding.

What a user converting 76 GB on a modest machine needs:
- The whole source is validated (config, quantization settings, every tensor's name, shape and dtype, the GPTQ
  values the layout relies on) before a byte is written, and free disk space is checked.
- Streaming: one module (a layer; the embedding; lm_head) is read, written and released at a time. Orbax
  snapshots what it writes and writing overlaps reading the next module, so host memory peaks near three layers,
  or twice the float16 embedding / lm_head when that is larger (2.5 GB each for 72B), never the model.
- Atomic: everything goes to a hidden staging directory next to DST, the marker file is written last and the
  staging directory is renamed to DST. An interrupted conversion leaves no DST, and its staging directory (no
  marker) is refused by qwen_jax.load and removed by the next conversion to the same DST.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from qwen_jax.checkpoint import orbax_io
from qwen_jax.checkpoint.loader import check_sources, open_checkpoint, place
from qwen_jax.checkpoint.pieces import checkpoint_specs
from qwen_jax.checkpoint.safetensors_io import CheckpointError
from qwen_jax.config import QwenConfig
from qwen_jax.model import abstract_params

__all__ = ["convert"]

METADATA_FILES = ("config.json", "generation_config.json", "qwen.tiktoken", "quantize_config.json")
_STAGING = ".{name}.converting-{pid}"


def _staging_dir(dst: Path) -> Path:
    return dst.parent / _STAGING.format(name=dst.name, pid=os.getpid())


def _remove_stale_staging(dst: Path) -> None:
    """Staging directories of conversions to `dst` whose process is gone (killed, crashed, powered off)."""
    for staging in dst.parent.glob(_STAGING.format(name=dst.name, pid="*")):
        pid = staging.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def convert(src: str | Path, dst: str | Path, progress: bool = True) -> Path:
    """Convert the checkpoint directory `src` into a new directory `dst`; returns `dst`."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    if orbax_io.is_converted(src):
        raise CheckpointError(f"{src}: already a converted qwen_jax checkpoint; load it directly")
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists; remove it or choose another destination")
    config = QwenConfig.from_json(src)
    sources, group = open_checkpoint(src, config)
    specs = checkpoint_specs(abstract_params(config, np.float32, group))
    check_sources(src, sources, specs)
    # Stored in the source dtypes (int8, float16 scales and floats): restore casts to the activation dtype.
    stored = {path: sources[path].dtype for path in specs}
    nbytes = {path: int(np.prod(spec.shape)) * stored[path].itemsize for path, spec in specs.items()}
    total = sum(nbytes.values())
    dst.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst.parent).free
    if free < total * 1.05:
        raise OSError(f"{dst.parent}: {free / 2**30:.1f} GiB free, the conversion needs about {total / 2**30:.1f} GiB")

    _remove_stale_staging(dst)
    staging = _staging_dir(dst)
    staging.mkdir()
    try:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        writer = orbax_io.ModuleWriter(staging)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"convert {src.name}",
                  disable=not progress, dynamic_ncols=True) as bar:
            for module, paths in orbax_io.group_by_module(specs).items():
                arrays = {}
                for path in paths:
                    # popped: once placed, the source's memory map is released
                    arrays[path] = place(sources.pop(path), specs[path].shape, stored[path], cpu)
                writer.write(module, arrays)
                bar.set_postfix_str(module, refresh=False)
                bar.update(sum(nbytes[path] for path in paths))
            writer.close()
        for name in METADATA_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, staging / name)
        orbax_io.write_marker(staging, group, str(src.resolve()), stored)
        os.rename(staging, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dst


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable: after a power loss DST is either absent or complete.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
