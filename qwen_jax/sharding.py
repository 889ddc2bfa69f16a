"""Placement as data: logical axis names on arrays, rules tables mapping them to mesh axes, and meshes."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# A strategy is a rules table: logical axis -> mesh axis (or None). Names absent from a table are replicated.
STRATEGIES: dict[str, Rules] = {
    "replicated": (),
}


def make_mesh(axis_sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with named axes, e.g. make_mesh({"data": 2, "model": 4})."""
    devices = list(devices if devices is not None else jax.devices())
    axis_sizes = dict(axis_sizes or {"model": len(devices)})
    total = int(np.prod(list(axis_sizes.values())))
    if total != len(devices):
        raise ValueError(f"mesh axes {axis_sizes} need {total} devices, {len(devices)} given")
    return Mesh(np.asarray(devices).reshape(tuple(axis_sizes.values())), tuple(axis_sizes))


def shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (as `jax.eval_shape(module.init)` gives)."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)
