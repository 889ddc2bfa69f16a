"""The model's parameters as checkpoints hold them: one piece per layer, assembled into the model's stacks on device.

Checkpoints (safetensors as published, and our converted orbax layout) store each layer's tensors separately:
`h_{i}/attn/c_attn/qvalue`. The model stacks every per-layer parameter over layers: `layers/attn/c_attn/qvalue`
[L, …] (qwen_jax.model). Loading writes each layer's piece into its stack in place (a donated update), so the
host holds one piece at a time and the devices one layer beyond the model; nothing the size of a stack is ever
built on the host.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax import sharding as sharding_lib
from qwen_jax.checkpoint.layout import ParamPath

LAYERS = "layers"  # top-level name of the model's stacked per-layer parameters


def checkpoint_specs(abstract) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """Every parameter piece in checkpoint order (`h_{i}/…` per layer for `layers/…` [L, …]), with its shape."""
    return {piece: spec for piece, (spec, _, _) in _pieces(traverse_util.flatten_dict(nn.unbox(abstract))).items()}


def _pieces(specs: dict) -> dict[ParamPath, tuple[jax.ShapeDtypeStruct, ParamPath, int | None]]:
    """piece -> (its spec, the model path it goes to, its layer index or None)."""
    stacked = [path for path in specs if path[0] == LAYERS]
    pieces = {}
    for path, spec in specs.items():
        if path[0] != LAYERS:
            pieces[path] = (spec, path, None)
        elif path == stacked[0]:  # all layers, layer-major like the checkpoints, where the stacks sit in the tree
            for i in range(spec.shape[0]):
                for p in stacked:
                    pieces[(f"h_{i}", *p[1:])] = (jax.ShapeDtypeStruct(specs[p].shape[1:], specs[p].dtype), p, i)
    return pieces


def cast(array: jax.Array, dtype) -> jax.Array:
    """`array` as `dtype`, on its devices and with its sharding."""
    return array if array.dtype == dtype else _astype(array, np.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _astype(array: jax.Array, dtype) -> jax.Array:
    return array.astype(dtype)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, layer: jax.Array, i) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)


class ModelParams:
    """The model's parameter tree on `mesh`, placed by `strategy`, filled piece by piece (`put`)."""

    def __init__(self, abstract, mesh: Mesh, strategy: str | sharding_lib.Rules):
        sharding_lib.check(abstract, mesh, strategy)  # before any weight is read
        specs = traverse_util.flatten_dict(nn.unbox(abstract))
        shardings = traverse_util.flatten_dict(sharding_lib.shardings(abstract, mesh, strategy))
        self._specs, self._shardings, self._pieces = specs, shardings, _pieces(specs)
        self._params: dict[ParamPath, jax.Array] = {}
        self._missing = set(self._pieces)

    def pieces(self) -> dict[ParamPath, tuple[jax.ShapeDtypeStruct, NamedSharding]]:
        """piece -> (shape and model dtype, the sharding it is placed with), in checkpoint order."""
        return {piece: (spec, self._piece_sharding(path, layer)) for piece, (spec, path, layer) in self._pieces.items()}

    def _piece_sharding(self, path: ParamPath, layer: int | None) -> NamedSharding:
        sharding = self._shardings[path]
        if layer is None:
            return sharding
        spec = tuple(sharding.spec) + (None,) * (len(self._specs[path].shape) - len(sharding.spec))
        if spec[0] is not None:
            raise ValueError(f"{'/'.join(path)}: its layers axis is split over mesh axes {spec[0]}; loading "
                             f"supports strategies that keep every layer on every device group")
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))

    def put(self, piece: ParamPath, array: jax.Array) -> None:
        """Store one piece (placed with its `pieces()` sharding), cast to the model dtype."""
        spec, path, layer = self._pieces[piece]
        self._missing.discard(piece)
        array = cast(array, spec.dtype)
        if layer is None:
            self._params[path] = array
            return
        if path not in self._params:
            self._params[path] = jnp.zeros(self._specs[path].shape, spec.dtype, device=self._shardings[path])
        self._params[path] = _set_layer(self._params[path], array, layer)

    def tree(self) -> dict:
        if self._missing:
            raise AssertionError(f"pieces never stored: {sorted(self._missing)[:5]}")
        return traverse_util.unflatten_dict(self._params)
