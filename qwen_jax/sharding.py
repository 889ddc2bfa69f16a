"""Placement as data: logical axis names on arrays, strategies as rules tables, meshes, and their checks.

Every parameter, activation and cache array of the model carries logical axis names (qwen_jax/model.py). A
strategy maps those names to the axes of a mesh; the model never sees either. All built-in strategies use the
mesh axes `data` and `model` (a 1-D device list is a `data`×`model` mesh with one axis of size 1), so any strategy
runs on any mesh shape and comparing them is a one-word change.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
        k_dim = 1 if names[path][:1] == ("layers",) else 0  # a linear's input axis (of scales: its groups)
        for dim, (size, logical) in enumerate(zip(spec.shape, names[path])):
            axes = [a for a in _mesh_axes_of(rules.get(logical)) if a in mesh.shape]
            parts = math.prod(mesh.shape[a] for a in axes)
            if size % parts == 0:
                continue
            what = f"size {size}, not divisible by mesh axes {axes} of {parts} devices"
            if path[-1] == "scales" and dim == k_dim:
                group = flat[path[:-1] + ("qvalue",)].shape[dim] // size
                what = (f"{size} groups of {group} inputs (a scales row each), not divisible by mesh axes {axes} "
                        f"of {parts} devices: each shard must hold whole groups")
            raise ShardingError(f"strategy {name!r} cannot shard {'/'.join(path)} {list(spec.shape)}: its axis "
                                f"{logical!r} has {what}")


def shardings(abstract_tree: Any, mesh: Mesh, rules: str | Rules) -> Any:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (as `jax.eval_shape(module.init)` gives)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_tree), mesh, get_rules(rules))


def named_sharding(mesh: Mesh, rules: str | Rules, logical_axes: Sequence[str | None]) -> NamedSharding:
    """The sharding of one array with the given logical axes (caches, inputs)."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), get_rules(rules))
    return NamedSharding(mesh, PartitionSpec(*spec))


def under_mesh() -> bool:
    """Whether a mesh is being traced under (`activate`): then kernels run under `shard_map` (below), on a 1×1 mesh
    too, where that is the whole array."""
    return not jax.sharding.get_abstract_mesh().empty


# --- kernels on the local shards -------------------------------------------------------------------------------------
# XLA's SPMD partitioner cannot see into a custom call (a Pallas kernel, cuDNN attention): under a mesh it would
# gather the sharded operands first. So a kernel runs under `shard_map` instead, on the shards the rules place on
# each device, with in/out specs derived from the same rules as the arrays themselves: no strategy has code here.


def _active_axes(logical: str | None) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that the rules in force map a logical axis to, while tracing under `activate`."""
    mesh = jax.sharding.get_abstract_mesh()
    if logical is None or mesh.empty:
        return ()
    rules = dict(nn.get_logical_axis_rules())
    return tuple(a for a in _mesh_axes_of(rules.get(logical)) if mesh.shape.get(a, 1) > 1)


def _entry(axes: Sequence[str]):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _distinct(specs: Sequence[Sequence[tuple[str, ...]]]) -> bool:
    """Whether no mesh axis splits two dimensions of one array (a PartitionSpec allows each axis once)."""
    return all(len(set(a for dim in spec for a in dim)) == sum(len(dim) for dim in spec) for spec in specs)


def _size(axes: Sequence[str]) -> int:
    """How many devices of the traced mesh these mesh axes span together."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in axes)


def local_shape(shape: Sequence[int], spec: PartitionSpec) -> tuple[int, ...] | None:
    """The shard shape of a [shape] array under `spec` on the traced mesh; None if a split does not divide."""
    out = []
    for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        parts = _size(_mesh_axes_of(entry))
        if size % parts:
            return None
        out.append(size // parts)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class LocalMatmul:
    """How y [*batch, *N] = x [*batch, K] @ W [(L,) K, *N] runs on local shards: W as placed, x split along K like
    W's K axis, each device's product summed over the mesh axes that split K — reduce-scattered along the first
    batch dimension over those that the rules put there, all-reduced over the rest."""

    x: PartitionSpec
    weight: PartitionSpec
    out: PartitionSpec
    sum_axes: tuple[str, ...]
    scatter_axes: tuple[str, ...]


def plan_matmul(batch_names: Sequence[str], batch_shape: Sequence[int], weight_names: Sequence[str],
                stacked: bool) -> LocalMatmul | None:
    """The `LocalMatmul` for an activation with leading logical axes `batch_names` (sizes `batch_shape`) and a weight
    with logical axes `weight_names` (K first; a stack's "layers" axis not included), under the mesh and rules in
    force; None where no kernel applies (a stack's layers axis split). A batch dimension too small for its split is
    computed whole on each device, as XLA would."""
    if stacked and _active_axes("layers"):
        return None
    w_dims = [_active_axes(name) for name in weight_names]
    k_axes, n_dims = w_dims[0], w_dims[1:]
    taken = set(k_axes) | {a for dim in n_dims for a in dim}
    kept = []
    for name, size in zip(batch_names, batch_shape):
        axes = tuple(a for a in _active_axes(name) if a not in taken)
        kept.append(axes if size % _size(axes) == 0 else ())
    scatter = ()
    if batch_names:
        scatter = tuple(a for a in k_axes if a in _active_axes(batch_names[0]))
        if batch_shape[0] % _size(kept[0] + scatter):
            scatter = ()
    out_batch = [kept[0] + scatter, *kept[1:]] if batch_names else []
    if not _distinct([w_dims, [*kept, k_axes], [*out_batch, *n_dims]]):
        return None
    return LocalMatmul(
        x=PartitionSpec(*map(_entry, kept), _entry(k_axes)),
        weight=PartitionSpec(*([None] if stacked else []), *map(_entry, w_dims)),
        out=PartitionSpec(*map(_entry, out_batch), *map(_entry, n_dims)),
        sum_axes=tuple(a for a in k_axes if a not in scatter), scatter_axes=scatter)


def local_specs(names_per_array: Sequence[Sequence[str | None]]) -> list[PartitionSpec] | None:
    """PartitionSpecs of arrays with these logical axes under the mesh and rules in force; None if the rules would
    split two dimensions of one array over the same mesh axis."""
    dims = [[_active_axes(name) for name in names] for names in names_per_array]
    if not _distinct(dims):
        return None
    return [PartitionSpec(*map(_entry, spec)) for spec in dims]


def run_local(fn, args: Sequence[Any], in_specs: Sequence[PartitionSpec], out_specs: Any):
    """`fn(*args)` on each device's shards of `args` (specs from `plan_matmul` / `local_specs`), on the traced mesh.

    Replication is not type-checked (check_vma off): a Pallas call does not declare how its outputs vary."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs, check_vma=False)(*args)


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
