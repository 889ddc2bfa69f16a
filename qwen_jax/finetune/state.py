"""Resumable training state on disk: orbax checkpoints of the LoRA factors, optimizer state, data position and RNG,
and the metrics log trimmed back to the checkpoint a run resumes from.

Orbax writes each checkpoint into a temporary directory and renames it into place: a run killed mid-write leaves
the previous checkpoint as the latest, never a torn one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp


def manager(directory: str | Path, keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, arrays: dict, meta: dict) -> None:
    """arrays: {"factors", "opt_state"} (device arrays, saved with their sharding); meta: JSON (data position, RNG)."""
    mngr.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, like: dict) -> tuple[int, dict, dict] | None:
    """(step, arrays placed like `like`, meta) of the newest checkpoint, or None if there is none."""
    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    restored = mngr.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    return step, restored["arrays"], restored["meta"]


def trim_metrics(path: Path, step: int) -> None:
    """Drop the log lines a killed run wrote past `step` (the resumed run writes them again); atomic."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a killed run
        if row.get("step", 0) <= step:
            kept.append(line)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, path)
