"""The Qwen (v1) transformer as Flax (linen) modules.

Parameters carry logical axis names (`nn.with_logical_partitioning`); the model never sees a mesh. A sharding
strategy maps those names to mesh axes (qwen_jax.sharding). Parameter names follow the checkpoint's:
`layers/attn/c_attn` stacks `transformer.h.{i}.attn.c_attn` over i, with two deliberate differences, both to keep the
weight matmuls wide (N large) and head-aligned:
  - `c_attn` keeps q|k|v fused as [embed, 3, heads, head_dim], so splitting `heads` splits q, k and v alike;
  - `mlp.w1` and `mlp.w2` are stacked as `mlp/w1w2` [embed, 2, mlp] (index 0 = w1 = up, 1 = w2 = gate).

Layers are stacked: every per-layer parameter is one array with a leading `layers` axis ([L, …]), and the
forward loops over the layer index with `lax.fori_loop`. Each module takes that index and reads its layer of the
stack in place: the fused int8 kernel offsets into the stack itself (letting XLA slice the layer first would copy
it, 2.2× slower on the H100), and the loop compiles once instead of L times (80 layers: 1.3 s instead of 19.8 s
with the kernel, BENCHMARKS.md). One layer's temporaries are live at a time, however deep the model.

Logical axes of parameters: vocab, embed, qkv, heads, head_dim, gate_up, mlp. Activations use their own names
(batch, seq, act_embed, act_heads, act_mlp, act_vocab; the cache kv_len, kv_heads), so that a strategy can shard
a weight dimension without sharding the activations of the same size (FSDP shards `embed`, not `act_embed`).
The K axis of `attn.c_proj` is heads × head_dim flattened and is named `heads`: any contiguous split of it into n parts with n dividing `heads` gives whole heads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from qwen_jax import attention
from qwen_jax import cache as kv_cache
from qwen_jax import frozen_linear
from qwen_jax import quant
from qwen_jax import sharding as sharding_lib
from qwen_jax.config import QwenConfig

Dtype = Any


def _logical(init, names):
    return nn.with_logical_partitioning(init, names)


def _int8_init(key, shape, dtype):
    return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(dtype)


def _param(module: nn.Module, name: str, init, shape, dtype, axes, layer):
    """A parameter declared per layer; with `layer`, the stored array is the stack [L, *shape] of all layers.

    Declared (init, abstract shapes) one layer at a time; applied to stacks, which linen would reject against the
    declared shape, so a stacked parameter is read as a variable and not re-declared.
    """
    if layer is None:
        return module.param(name, _logical(init, axes), shape, dtype)
    return module.get_variable("params", name)


class Linear(nn.Module):
    """x [..., K] -> [..., *out_shape]: a float kernel, or int8 values with per-group float16 scales."""

    in_features: int
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of (K, *out_shape)
    dtype: Dtype
    quant_group: int | None = None
    use_bias: bool = False
    out_dtype: Dtype | None = None
    lora_parts: tuple[str, ...] = ()  # names of the slices of out axis 0 adapted separately (frozen_linear)

    @nn.compact
    def __call__(self, x: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        """With `layer`, the parameters are stacks [L, …] and layer `layer` is used (read in place)."""
        shape = (self.in_features, *self.out_shape)
        if self.quant_group:
            if self.in_features % self.quant_group:
                raise ValueError(f"{self.name}: group size {self.quant_group} does not divide K={self.in_features}")
            groups = self.in_features // self.quant_group
            weight = {
                "qvalue": _param(self, "qvalue", _int8_init, shape, jnp.int8, self.axes, layer),
                "scales": _param(self, "scales", nn.initializers.constant(1e-3), (groups, *self.out_shape),
                                 jnp.float16, self.axes, layer),
            }
        else:
            init = nn.initializers.normal(self.in_features ** -0.5)
            weight = {"kernel": _param(self, "kernel", init, shape, self.dtype, self.axes, layer)}
        y = frozen_linear.matmul(x.astype(self.dtype), weight, self.out_dtype, layer, self.axes)
        if self.has_variable("params", "lora"):  # attached by qwen_jax.finetune.lora
            lora = self.get_variable("params", "lora")
            y = y + frozen_linear.lora_delta(x.astype(self.dtype), lora, self.out_shape, self.lora_parts,
                                             layer).astype(y.dtype)
        if self.use_bias:
            bias = _param(self, "bias", nn.initializers.zeros, self.out_shape, self.dtype, self.axes[1:], layer)
            y = y + quant.at_layer(bias, layer).astype(y.dtype)
        return y


class RMSNorm(nn.Module):
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        weight = _param(self, "weight", nn.initializers.ones, (x.shape[-1],), self.dtype, ("embed",), layer)
        weight = quant.at_layer(weight, layer)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * weight


# --- position encodings (pure functions, float32) --------------------------------------------------------------


def rope_tables(positions: jax.Array, base: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """positions [B, S] int, base [B] float32 -> cos, sin [B, S, head_dim] float32 (NeoX rotate-half layout)."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim  # [head_dim/2]
    inv_freq = 1.0 / (base[:, None] ** exponent[None, :])  # [B, head_dim/2]
    angle = positions.astype(jnp.float32)[:, :, None] * inv_freq[:, None, :]  # [B, S, head_dim/2]
    angle = jnp.concatenate([angle, angle], axis=-1)
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, H, head_dim] rotated in float32; returns float32 (the caller casts once)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def logn_scale(positions: jax.Array, seq_length: int) -> jax.Array:
    """positions [B, S] -> [B, S] float32: log(p+1)/log(seq_length) past the training length, else 1."""
    p1 = positions.astype(jnp.float32) + 1.0
    return jnp.where(p1 > seq_length, jnp.log(p1) / np.log(seq_length), 1.0)


def rope_base(config: QwenConfig, ntk_alpha: jax.Array) -> jax.Array:
    """ntk_alpha [B] -> the RoPE base per row [B] (dynamic NTK scales the base, not the positions)."""
    hd = config.head_dim
    return config.rotary_emb_base * ntk_alpha.astype(jnp.float32) ** (hd / (hd - 2))


class Attention(nn.Module):
    config: QwenConfig
    dtype: Dtype
    quant_group: int | None

    @nn.compact
    def __call__(self, x, cos, sin, logn, positions, layer=None, cache=None, attend_cache=False):
        """x [B, S, embed] -> ([B, S, embed], updated cache or None).

        cos/sin [B, S, head_dim]; logn, positions [B, S]. This call's keys are written to the cache's layer `layer`
        (if given) at slots positions[b, 0] … of row b. With `attend_cache` each query attends to that layer's
        slots up to its own position; else to this call's own S tokens, causally.
        """
        c = self.config
        heads, hd = c.num_attention_heads, c.head_dim
        qkv = Linear(c.hidden_size, (3, heads, hd), ("embed", "qkv", "heads", "head_dim"), self.dtype,
                     self.quant_group, use_bias=True, name="c_attn")(x, layer)  # [B, S, 3, H, hd]
        qkv = nn.with_logical_constraint(qkv, ("batch", "seq", "qkv", "act_heads", "head_dim"))
        q = (apply_rope(qkv[:, :, 0], cos, sin) * logn[:, :, None, None]).astype(self.dtype)
        k = apply_rope(qkv[:, :, 1], cos, sin).astype(self.dtype)
        v = qkv[:, :, 2]
        if cache is not None:
            cache = kv_cache.write(cache, layer, k, v, positions[:, 0])
        if attend_cache:
            out = kv_cache.attend(cache, layer, q, positions)
        else:
            out = attention.causal_self_attention(q, k, v, positions)  # [B, S, H, hd]
        out = nn.with_logical_constraint(out, ("batch", "seq", "act_heads", "head_dim"))
        out = out.reshape(*out.shape[:2], heads * hd)
        out = Linear(heads * hd, (c.hidden_size,), ("heads", "embed"), self.dtype, self.quant_group,
                     name="c_proj")(out, layer)
        return out, cache


class MLP(nn.Module):
    config: QwenConfig
    dtype: Dtype
    quant_group: int | None

    @nn.compact
    def __call__(self, x, layer=None):
        c = self.config
        up_gate = Linear(c.hidden_size, (2, c.mlp_width), ("embed", "gate_up", "mlp"), self.dtype,
                         self.quant_group, lora_parts=("w1", "w2"), name="w1w2")(x, layer)  # [B, S, 2, mlp]
        up_gate = nn.with_logical_constraint(up_gate, ("batch", "seq", "gate_up", "act_mlp"))
        hidden = up_gate[:, :, 0] * jax.nn.silu(up_gate[:, :, 1])  # w2 is the gate
        return Linear(c.mlp_width, (c.hidden_size,), ("mlp", "embed"), self.dtype, self.quant_group,
                      name="c_proj")(hidden, layer)


class Block(nn.Module):
    config: QwenConfig
    dtype: Dtype
    quant_group: int | None

    @nn.compact
    def __call__(self, x, cos, sin, logn, positions, layer=None, cache=None, attend_cache=False):
        eps = self.config.layer_norm_epsilon
        attn_out, cache = Attention(self.config, self.dtype, self.quant_group, name="attn")(
            RMSNorm(eps, self.dtype, name="ln_1")(x, layer), cos, sin, logn, positions, layer, cache, attend_cache)
        h = x + attn_out
        out = h + MLP(self.config, self.dtype, self.quant_group, name="mlp")(
            RMSNorm(eps, self.dtype, name="ln_2")(h, layer), layer)
        return nn.with_logical_constraint(out, ("batch", "seq", "act_embed")), cache


class Embed(nn.Module):
    num_embeddings: int
    features: int
    dtype: Dtype

    @nn.compact
    def __call__(self, ids):
        table = self.param("embedding", _logical(nn.initializers.normal(1.0), ("vocab", "embed")),
                           (self.num_embeddings, self.features), self.dtype)
        return jnp.take(table, ids, axis=0)


@dataclasses.dataclass(frozen=True, eq=False)
class HostEmbedding:
    """The token-embedding table [vocab, embed] kept in host memory, looked up through a host callback.

    A forward reads one row per token, so the table need not take device memory: for Qwen-72B that frees 2.3 GiB
    of an 80 GB GPU for the KV cache, for one small host round trip per decode step. Hashed by identity (the
    model is a static argument of the jitted steps).
    """

    table: np.ndarray  # [vocab, embed]

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [B, S] int32 -> [B, S, embed] in the table's dtype."""
        out = jax.ShapeDtypeStruct((*ids.shape, self.table.shape[1]), self.table.dtype)
        return jax.pure_callback(lambda i: self.table[np.asarray(i)], out, ids)


def check_embedding_on_host(mesh: Mesh | None) -> None:
    """HostEmbedding serves one device: its callback's output is not partitioned."""
    if mesh is not None and mesh.size > 1:
        raise ValueError(f"the embedding table can stay on the host only for a model on one device; this mesh "
                         f"spans {mesh.size} devices ({dict(mesh.shape)})")


@dataclasses.dataclass(frozen=True)
class Qwen:
    """The whole model: embedding, L stacked blocks under `lax.fori_loop`, final norm, lm_head.

    A hashable description (a static argument of the jitted callers) with the forward as `__call__`;
    parameters are passed in, never held.
    """

    config: QwenConfig
    dtype: Dtype = jnp.bfloat16
    quant_group: int | None = None  # group size of int8 linears; None = float linears
    host_embedding: HostEmbedding | None = None  # then params has no "wte"
    # Training: each layer's forward is recomputed in the backward pass from its input, the only thing kept per
    # layer (no activations, no dequantized weights).
    remat: bool = False

    def _modules(self) -> dict[str, nn.Module]:
        c = self.config
        return {
            "wte": Embed(c.vocab_size, c.hidden_size, self.dtype),
            "layers": Block(c, self.dtype, self.quant_group),
            "ln_f": RMSNorm(c.layer_norm_epsilon, self.dtype),
            "lm_head": Linear(c.hidden_size, (c.vocab_size,), ("embed", "vocab"), self.dtype, None,
                              out_dtype=jnp.float32),
        }

    def abstract_params(self) -> Any:
        """Shapes, dtypes and logical axes of every parameter, without allocating any (`nn.LogicallyPartitioned`)."""
        c, key = self.config, jax.random.key(0)
        x = jax.ShapeDtypeStruct((1, 1, c.hidden_size), self.dtype)
        rope = jax.ShapeDtypeStruct((1, 1, c.head_dim), jnp.float32)
        logn = jax.ShapeDtypeStruct((1, 1), jnp.float32)
        positions = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        inputs = {"wte": (positions,), "layers": (x, rope, rope, logn, positions),
                  "ln_f": (x,), "lm_head": (x,)}
        tree = {name: jax.eval_shape(module.init, key, *inputs[name])["params"]
                for name, module in self._modules().items()}

        def stack(box):
            value = jax.ShapeDtypeStruct((c.num_hidden_layers, *box.value.shape), box.value.dtype)
            return box.replace(value=value, names=("layers", *box.names))

        tree["layers"] = jax.tree_util.tree_map(stack, tree["layers"],
                                                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        return tree

    def __call__(self, params, ids, positions, ntk_alpha, cache=None, logits_index=None, prefill=False):
        """ids, positions [B, S] int32, consecutive in each row; ntk_alpha [B] float32 (1 = no NTK scaling).

        cache: None for a plain forward, else a KV cache (qwen_jax.cache); this call's tokens are written at
          slots positions[:, 0] … positions[:, 0] + S - 1 of each row, and attend to every slot up to their own
          position — or, with `prefill`, only to each other (flash attention on a GPU): the caller guarantees that
          the rows' context starts with this call (positions[:, 0] == 0).
        logits_index [B]: if given, logits only at that index of each row (the last real token of a prefill).
        Returns (float32 logits [B, S or 1, vocab_size] with padded vocabulary rows at -inf, updated cache or None).
        """
        c, modules = self.config, self._modules()
        if self.host_embedding is None:
            x = modules["wte"].apply({"params": params["wte"]}, ids)
        else:
            x = self.host_embedding(ids).astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
        cos, sin = rope_tables(positions, rope_base(c, ntk_alpha), c.head_dim)
        logn = logn_scale(positions, c.seq_length) if c.use_logn_attn else jnp.ones(positions.shape, jnp.float32)
        attend_cache = cache is not None and not prefill

        def layer_step(layer, carry):
            x, cache = carry
            return modules["layers"].apply({"params": params["layers"]}, x, cos, sin, logn, positions, layer, cache,
                                           attend_cache)

        if self.remat:
            layer_step = jax.checkpoint(layer_step, policy=jax.checkpoint_policies.nothing_saveable)
        x, cache = jax.lax.fori_loop(0, c.num_hidden_layers, layer_step, (x, cache))
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)  # [B, 1, embed]
        x = modules["ln_f"].apply({"params": params["ln_f"]}, x)
        logits = modules["lm_head"].apply({"params": params["lm_head"]}, x)
        logits = nn.with_logical_constraint(logits, ("batch", "seq", "act_vocab"))
        real = jnp.arange(c.vocab_size) < c.num_real_tokens
        return jnp.where(real, logits, -jnp.inf), cache


def abstract_params(config: QwenConfig, dtype: Dtype, quant_group: int | None = None) -> Any:
    return Qwen(config, dtype, quant_group).abstract_params()


def apply(module: Qwen, params, *args, mesh=None, rules=(), **kwargs):
    """`module(params, …)` with the strategy's activation shardings in force (traced inside a jitted caller)."""
    if mesh is None:
        return module(params, *args, **kwargs)
    with sharding_lib.activate(mesh, rules):
        return module(params, *args, **kwargs)


@functools.partial(jax.jit, static_argnames=("module", "mesh", "rules"))
def _forward(module: Qwen, params, ids, positions, ntk_alpha, mesh=None, rules=()):
    return apply(module, params, ids, positions, ntk_alpha, mesh=mesh, rules=rules)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class QwenModel:
    """A loaded model: config, parameters on their devices, where they live, and the jitted entry points."""

    config: QwenConfig
    params: Any
    dtype: Dtype = jnp.bfloat16
    quant_group: int | None = None
    generation_config: dict = dataclasses.field(default_factory=dict)  # the checkpoint's generation defaults
    mesh: Mesh | None = None  # None: a single device
    rules: sharding_lib.Rules = ()  # the strategy's logical-axis rules table
    kv_dtype: Dtype | None = None  # the KV cache's: None = `dtype`; jnp.int8 = quantized (half the memory)
    host_embedding: HostEmbedding | None = None  # the embedding table, when kept in host memory

    @property
    def module(self) -> Qwen:
        return Qwen(self.config, self.dtype, self.quant_group, self.host_embedding)

    def with_embedding_on_host(self) -> "QwenModel":
        """This model with its embedding table moved from device to host memory (HostEmbedding): single device."""
        if self.host_embedding is not None:
            return self
        check_embedding_on_host(self.mesh)
        table = np.asarray(jax.device_get(self.params["wte"]["embedding"]))
        params = {name: tree for name, tree in self.params.items() if name != "wte"}
        return dataclasses.replace(self, params=params, host_embedding=HostEmbedding(table))

    @property
    def cache_dtype(self) -> Dtype:
        """The KV cache's dtype: `kv_dtype`, else the model's."""
        return self.dtype if self.kv_dtype is None else self.kv_dtype

    @property
    def placement(self) -> dict:
        """Keyword arguments that put a jitted call under this model's mesh and rules."""
        return {"mesh": self.mesh, "rules": tuple(self.rules)}

    def new_cache(self, batch: int, max_len: int) -> kv_cache.Cache:
        """An empty KV cache for `batch` rows of `max_len` slots, placed like the model."""
        return kv_cache.init_cache(self.config, batch, max_len, self.cache_dtype, **self.placement)

    def preflight(self, batch: int, prompt_len: int, max_len: int, prefill_chunk: int | None = None,
                  resident: dict[str, int] | None = None) -> None:
        """Raise cache.MemoryPreflightError, with the numbers, if a request of this size cannot fit in memory
        (beside `resident` bytes, see cache.preflight)."""
        kv_cache.preflight(self.config, batch, prompt_len, max_len, self.dtype, quant_group=self.quant_group,
                           kv_dtype=self.cache_dtype, prefill_chunk=prefill_chunk, resident=resident, **self.placement)

    def cache_bytes_per_device(self, batch: int, max_len: int) -> int:
        return kv_cache.cache_bytes_per_device(self.config, batch, max_len, self.cache_dtype, **self.placement)

    def logits(self, input_ids) -> jax.Array:
        """input_ids [batch, seq] int -> float32 logits [batch, seq, vocab_size] (full forward, no cache).

        Rows are scored independently with positions 0..seq-1; right-padding a row does not change the logits of
        its real tokens (attention is causal), except through dynamic NTK, whose factor follows `seq`.
        """
        ids = jnp.asarray(input_ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        batch, seq = ids.shape
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        alpha = jnp.full((batch,), self.config.ntk_alpha(seq), jnp.float32)
        return _forward(self.module, self.params, ids, positions, alpha, **self.placement)
