"""LoRA factors for the model's linears: which linears (PEFT's name matching), shapes, logical axes, init, and
how they join the base parameters (attached for a forward, or merged into float weights).

Trainable factors mirror the parameter tree: `{"layers": {"attn": {"c_attn": {"a", "b"}}, "mlp": {"w1w2": {"w1":
{"a", "b"}, "w2": …}}}, "lm_head": {"a", "b"}}`. For a linear of K inputs and outputs [*out], a is [K, r] (logical
axes: W's input axis, then `lora_rank`) and b is [r, *out] (then W's output axes); stacked layers add a leading
[L] (`layers`). `mlp/w1w2` stacks w1 (up) and w2 (gate) on its out axis 0: each takes its own factors, as the
separate `mlp.w1` / `mlp.w2` modules do in PEFT. b is stored unscaled (PEFT's lora_B); the scale alpha / r is
applied when the factors are attached, so gradients are those of PEFT's parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qwen_jax import sharding as sharding_lib
from qwen_jax.config import QwenConfig

DEFAULT_TARGETS = ("c_attn", "c_proj", "w1", "w2")  # Qwen finetune.py's lora_target_modules


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Qwen's finetune.py defaults. `target_modules`: names matched as PEFT does (a module matches a name it equals
    or ends with "." + name), or one regular expression matched against whole module names."""

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
    use_rslora: bool = False  # PEFT's rank-stabilized scale alpha / sqrt(r)

    def __post_init__(self):
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclasses.dataclass(frozen=True)
class Target:
    """One adaptable linear: its checkpoint module name, where its weight sits in our parameter tree."""

    module: str  # HF module name, "{i}" for the layer index
    path: tuple[str, ...]  # the Linear's parameters in our tree
    part: str | None  # the slice of out axis 0 it owns (mlp/w1w2), else None: the whole output
    in_axis: str
    out_axes: tuple[str, ...]

    @property
    def stacked(self) -> bool:
        return self.path[0] == "layers"

    @property
    def key(self) -> tuple[str, ...]:
        """Where its factors sit in the trainable tree."""
        return self.path + ((self.part,) if self.part else ())

    def shapes(self, config: QwenConfig) -> tuple[int, tuple[int, ...]]:
        """(K, out shape) of this linear (for a part: its slice)."""
        d, f, v = config.hidden_size, config.mlp_width, config.vocab_size
        return {"c_attn": (d, (3, config.num_attention_heads, config.head_dim)),
                "attn.c_proj": (d, (d,)), "w1": (d, (f,)), "w2": (d, (f,)), "mlp.c_proj": (f, (d,)),
                "lm_head": (d, (v,))}[self.short]

    @property
    def short(self) -> str:
        name = self.module.split(".")[-1]
        return name if name != "c_proj" else ".".join(self.module.split(".")[-2:])


LINEARS = (
    Target("transformer.h.{i}.attn.c_attn", ("layers", "attn", "c_attn"), None, "embed", ("qkv", "heads", "head_dim")),
    Target("transformer.h.{i}.attn.c_proj", ("layers", "attn", "c_proj"), None, "heads", ("embed",)),
    Target("transformer.h.{i}.mlp.w1", ("layers", "mlp", "w1w2"), "w1", "embed", ("mlp",)),
    Target("transformer.h.{i}.mlp.w2", ("layers", "mlp", "w1w2"), "w2", "embed", ("mlp",)),
    Target("transformer.h.{i}.mlp.c_proj", ("layers", "mlp", "c_proj"), None, "mlp", ("embed",)),
    Target("lm_head", ("lm_head",), None, "embed", ("vocab",)),
)


def _matches(name: str, targets: tuple[str, ...] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select(config: QwenConfig, lora: LoraConfig) -> list[Target]:
    """The linears `lora.target_modules` names; every name must match something, and a per-layer linear in all
    layers or none (layers are stacked, so one set of factors spans them all)."""
    chosen = []
    for target in LINEARS:
        names = [target.module.format(i=i) for i in range(config.num_hidden_layers)] if target.stacked else [target.module]
        hits = [_matches(n, lora.target_modules) for n in names]
        if all(hits):
            chosen.append(target)
        elif any(hits):
            raise ValueError(f"target_modules {lora.target_modules!r} match {target.module} in only {sum(hits)} of "
                             f"{len(hits)} layers; LoRA applies to a linear in every layer or none")
    if isinstance(lora.target_modules, tuple):
        for name in lora.target_modules:
            if not any(_matches(t.module.format(i=0), (name,)) for t in LINEARS):
                raise ValueError(f"target module {name!r} matches no linear of the model; adaptable: "
                                 f"{[t.module for t in LINEARS]} (wte is an embedding, not supported)")
    if not chosen:
        raise ValueError(f"target_modules {lora.target_modules!r} match no linear of the model")
    return chosen


def factor_specs(config: QwenConfig, targets: Sequence[Target], r: int) -> dict:
    """Shapes (float32) and logical axes of the factors of rank r, as `nn.LogicallyPartitioned` leaves."""
    tree: dict = {}
    for t in targets:
        k, out = t.shapes(config)
        lead, lead_axes = ((config.num_hidden_layers,), ("layers",)) if t.stacked else ((), ())
        put(tree, t.key, {
            "a": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((*lead, k, r), jnp.float32),
                                         (*lead_axes, t.in_axis, "lora_rank")),
            "b": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((*lead, r, *out), jnp.float32),
                                         (*lead_axes, "lora_rank", *t.out_axes)),
        })
    return tree


def shardings(specs: dict, mesh: Mesh, rules) -> dict:
    """NamedShardings of the factors (and of their gradients and optimizer moments) under a rules table."""
    return sharding_lib.shardings(specs, mesh, rules)


def init(seed: int, specs: dict, mesh: Mesh, rules) -> dict:
    """PEFT's initialization, placed by the rules: a ~ U(±1/sqrt(K)) (kaiming_uniform, a=sqrt(5)), b = 0.

    Drawn on the host with NumPy, one generator per factor seeded by (seed, its path): no compilation, and the
    values do not depend on the mesh."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    placed = shardings(specs, mesh, rules)

    def make(path, box, sharding):
        shape = box.value.shape
        if box.names[-1] != "lora_rank":  # b: [.., r, *out]
            return jax.device_put(np.zeros(shape, np.float32), sharding)
        bound = 1.0 / math.sqrt(shape[-2])  # a: [.., K, r]
        rng = np.random.default_rng([seed, zlib.crc32(jax.tree_util.keystr(path).encode())])
        return jax.device_put(rng.uniform(-bound, bound, shape).astype(np.float32), sharding)

    return jax.tree_util.tree_map_with_path(make, specs, placed, is_leaf=is_box)


def attach(params: dict, factors: dict, scale: float, dropout_rate: float = 0.0,
           dropout_key: jax.Array | None = None) -> dict:
    """The base parameters with each adapted Linear's factors under its "lora" entry (frozen_linear's layout):
    b scaled by `scale`; with a dropout key, each adapted linear drops its input with its own key."""

    def factors_entry(f: dict, path: str) -> dict:
        entry = {"a": f["a"], "b": f["b"] * scale}
        if dropout_key is not None and dropout_rate > 0:
            key = jax.random.fold_in(dropout_key, zlib.crc32(path.encode()))
            entry |= {"dropout_key": jax.random.key_data(key), "dropout_rate": jnp.float32(dropout_rate)}
        return entry

    def walk(p: dict, f: dict, path: str) -> dict:
        if "kernel" in p or "qvalue" in p:  # a Linear
            if "a" in f:
                return {**p, "lora": factors_entry(f, path)}
            return {**p, "lora": {part: factors_entry(sub, f"{path}/{part}") for part, sub in f.items()}}
        return {**p, **{name: walk(p[name], sub, f"{path}/{name}") for name, sub in f.items()}}

    return walk(params, factors, "")


def delta_weight(factors: dict) -> jax.Array:
    """a [.., K, r], b [.., r, *out] -> a @ b [.., K, *out] in float32 (unscaled)."""
    a, b = factors["a"].astype(jnp.float32), factors["b"].astype(jnp.float32)
    lead, out = a.shape[:-2], b.shape[a.ndim - 1:]
    dw = jnp.matmul(a, b.reshape(*lead, a.shape[-1], -1), precision=jax.lax.Precision.HIGHEST)
    return dw.reshape(*a.shape[:-1], *out)


@functools.partial(jax.jit, static_argnames=("part_index",))
def _merged_kernel(kernel, a, b, scale, part_index=None):
    dw = scale * delta_weight({"a": a, "b": b})
    w = kernel.astype(jnp.float32)
    w = w + dw if part_index is None else w.at[..., part_index, :].add(dw)
    return w.astype(kernel.dtype)


def merge(params: dict, factors: dict, scale: float) -> dict:
    """Float base parameters with W + scale · a @ b folded in (in float32, rounded once to W's dtype), one kernel
    at a time (peak memory: one extra kernel stack)."""

    def walk(p: dict, f: dict, path: tuple[str, ...]) -> dict:
        if "qvalue" in p:
            raise ValueError(f"{'/'.join(path)} is int8: an adapter is merged into float weights only; "
                             "on an int8 base it is kept separate (attach)")
        if "kernel" in p:
            kernel = p["kernel"]
            for part, sub in ([(None, f)] if "a" in f else f.items()):
                kernel = _merged_kernel(kernel, sub["a"], sub["b"], scale, PART_INDEX.get(part))
            return {**p, "kernel": kernel}
        return {**p, **{name: walk(p[name], sub, path + (name,)) for name, sub in f.items()}}

    return walk(params, factors, ())


PART_INDEX = {"w1": 0, "w2": 1}  # mlp/w1w2's out axis 0 (model.MLP)


def put(tree: dict, key: tuple[str, ...], value: Any) -> None:
    for name in key[:-1]:
        tree = tree.setdefault(name, {})
    tree[key[-1]] = value


def num_params(factors: dict) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(factors))
