"""Placement as data: logical axis names on arrays, strategies as rules tables, meshes, and their checks.

Every parameter, activation and cache array of the model carries logical axis names (qwen_jax/model.py). A
strategy maps those names to the axes of a mesh; the model never sees either. All built-in strategies use the
mesh axes `data` and `model` (a 1-D device list is a `data`×`model` mesh with one axis of size 1), so any strategy
runs on any mesh shape and comparing them is a one-word change.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, Any], ...]
MESH_AXES = ("data", "model")
BOTH = ("data", "model")  # shard over every device of the mesh

# Megatron tensor parallelism: q/k/v and w1‖w2 split by output (heads, mlp), both c_proj split by input, so each
# sub-block ends in one all-reduce; the KV cache follows the heads; lm_head and the embedding are vocab-parallel.
_TENSOR_PARALLEL = (("heads", "model"), ("act_heads", "model"), ("kv_heads", "model"), ("mlp", "model"),
                    ("act_mlp", "model"), ("vocab", "model"), ("act_vocab", "model"))


# A strategy is a rules table: logical axis -> mesh axis, a tuple of mesh axes, or None. Names absent are replicated.
STRATEGIES: dict[str, Rules] = {
    # Every array whole on every device; devices run identical copies.
    "replicated": (),
    # Data parallel: weights replicated, batch rows split over all devices.
    "dp": (("batch", BOTH),),
    # Megatron tensor parallel over all devices.
    "tp": tuple((name, BOTH) for name, _ in _TENSOR_PARALLEL),
    # Weights split on their embed axis over all devices and gathered layer by layer; batch split.
    "fsdp": (("embed", BOTH), ("batch", BOTH)),
    # Batch over the data axis × tensor parallel over the model axis.
    "dp_tp": (("batch", "data"), *_TENSOR_PARALLEL),
    # Tensor parallel over the model axis; weights also split (and gathered per layer) over the data axis.
    "fsdp_tp": (("embed", "data"), ("batch", "data"), *_TENSOR_PARALLEL),
}

# How `load(strategy=...)` lays out all local devices when no mesh is given: on the model axis (1×n) or data (n×1).
DEFAULT_MESH_AXIS = {"replicated": "data", "dp": "data", "tp": "model", "fsdp": "data", "dp_tp": "model",
                     "fsdp_tp": "model"}


class ShardingError(ValueError):
    """A strategy that cannot place this model on this mesh; raised before any weight is read."""


def get_rules(strategy: str | Rules) -> Rules:
    """A strategy's rules table, by name; a table given directly is returned as is (custom strategies)."""
    if not isinstance(strategy, str):
        return tuple(strategy)
    try:
        return STRATEGIES[strategy]
    except KeyError:
        raise ShardingError(f"unknown strategy {strategy!r}; known: {sorted(STRATEGIES)}") from None


def make_mesh(axis_sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with named axes, e.g. make_mesh({"data": 2, "model": 4})."""
    devices = list(devices if devices is not None else jax.devices())
    axis_sizes = dict(axis_sizes or {"data": 1, "model": len(devices)})
    total = math.prod(axis_sizes.values())
    if total != len(devices):
        raise ShardingError(f"mesh axes {axis_sizes} need {total} devices, {len(devices)} given")
    return Mesh(np.asarray(devices, dtype=object).reshape(tuple(axis_sizes.values())), tuple(axis_sizes))


def default_mesh(strategy: str | Rules, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh `load(strategy=...)` uses when given none: every local device on the axis the strategy splits
    (1×n for model, n×1 for data); for "replicated", the first local device alone (copies would only cost memory)."""
    devices = list(devices if devices is not None else jax.local_devices())
    if strategy == "replicated":
        return make_mesh({"data": 1, "model": 1}, devices[:1])
    n = len(devices)
    axis = DEFAULT_MESH_AXIS.get(strategy, "model") if isinstance(strategy, str) else "model"
    return make_mesh({"data": 1, "model": n} if axis == "model" else {"data": n, "model": 1}, devices)


def _mesh_axes_of(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check(abstract_tree: Any, mesh: Mesh, strategy: str | Rules) -> None:
    """Fail with a precise message if `strategy` cannot shard every array of `abstract_tree` on `mesh`."""
    rules = get_rules(strategy)
    known = set(MESH_AXES) | {a for _, entry in rules for a in _mesh_axes_of(entry)}
    unknown = [a for a in mesh.axis_names if a not in known]
    if unknown:
        raise ShardingError(f"mesh axis {unknown[0]!r} is unknown to the rules of strategy {strategy!r}, which use "
                            f"the mesh axes {sorted(known)}; build the mesh with make_mesh({{'data': …, 'model': …}})")
    rules = dict(rules)
    name = strategy if isinstance(strategy, str) else "custom"
    flat = traverse_util.flatten_dict(nn.unbox(abstract_tree)) if isinstance(abstract_tree, Mapping) else {}
    names = traverse_util.flatten_dict(nn.get_partition_spec(abstract_tree)) if flat else {}
    for path, spec in flat.items():
        for size, logical in zip(spec.shape, names[path]):
            axes = [a for a in _mesh_axes_of(rules.get(logical)) if a in mesh.shape]
            parts = math.prod(mesh.shape[a] for a in axes)
            if size % parts:
                raise ShardingError(
                    f"strategy {name!r} cannot shard {'/'.join(path)} {list(spec.shape)}: its axis "
                    f"{logical!r} has size {size}, not divisible by mesh axes {axes} of {parts} devices")


def shardings(abstract_tree: Any, mesh: Mesh, rules: str | Rules) -> Any:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (as `jax.eval_shape(module.init)` gives)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_tree), mesh, get_rules(rules))


def named_sharding(mesh: Mesh, rules: str | Rules, logical_axes: Sequence[str | None]) -> NamedSharding:
    """The sharding of one array with the given logical axes (caches, inputs)."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), get_rules(rules))
    return NamedSharding(mesh, PartitionSpec(*spec))


def traced_devices() -> int:
    """How many devices the mesh being traced under (`activate`) spans; 1 outside any mesh.

    Custom calls (Pallas kernels, cuDNN attention) run only where this is 1: XLA's SPMD partitioner cannot see
    into them and would gather their sharded operands."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.size


@contextlib.contextmanager
def activate(mesh: Mesh, rules: str | Rules):
    """While tracing (inside jit): the mesh and rules that turn the model's logical constraints into shardings."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(get_rules(rules)):
        yield


def to_host(tree: Any) -> Any:
    """NumPy copies of a tree of arrays, gathered across processes where a process holds only part of one."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(fetch, tree)
