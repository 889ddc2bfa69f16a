"""The Qwen (v1) transformer as Flax (linen) modules.

Parameters carry logical axis names (`nn.with_logical_partitioning`); the model never sees a mesh. A sharding
strategy maps those names to mesh axes (qwen_jax.sharding). Parameter names follow the checkpoint's:
`h_{i}/attn/c_attn` is `transformer.h.{i}.attn.c_attn`, with two deliberate differences, both to keep the
weight matmuls wide (N large) and head-aligned:
  - `c_attn` keeps q|k|v fused as [embed, 3, heads, head_dim], so splitting `heads` splits q, k and v alike;
  - `mlp.w1` and `mlp.w2` are stacked as `mlp/w1w2` [embed, 2, mlp] (index 0 = w1 = up, 1 = w2 = gate).

Layers are separate modules in a Python loop (`h_0 … h_{L-1}`), not one stacked array under `lax.scan`:
on the H100 (jax 0.11.2) a stacked int8 weight sliced inside a scan defeated XLA's int8→bf16 convert fusion
(2.6–4× slower), and a fused kernel fed a dynamic slice would copy it first. See BENCHMARKS.md for the
compile-time cost of unrolling.

Logical axes: vocab, embed, qkv, heads, head_dim, gate_up, mlp (parameters);
batch, seq, kv_len (activations and cache). The K axis of `attn.c_proj` is heads × head_dim flattened and is
named `heads`: any contiguous split of it into n parts with n dividing `heads` gives whole heads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import cache as kv_cache
from qwen_jax import quant
from qwen_jax.config import QwenConfig

Dtype = Any


def _logical(init, names):
    return nn.with_logical_partitioning(init, names)


def _int8_init(key, shape, dtype):
    return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(dtype)


class Linear(nn.Module):
    """x [..., K] -> [..., *out_shape]: a float kernel, or int8 values with per-group float16 scales."""

    in_features: int
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of (K, *out_shape)
    dtype: Dtype
    quant_group: int | None = None
    use_bias: bool = False
    out_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.in_features, *self.out_shape)
        if self.quant_group:
            if self.in_features % self.quant_group:
                raise ValueError(f"{self.name}: group size {self.quant_group} does not divide K={self.in_features}")
            groups = self.in_features // self.quant_group
            weight = {
                "qvalue": self.param("qvalue", _logical(_int8_init, self.axes), shape, jnp.int8),
                "scales": self.param(
                    "scales", _logical(nn.initializers.constant(1e-3), self.axes),
                    (groups, *self.out_shape), jnp.float16,
                ),
            }
        else:
            init = nn.initializers.normal(self.in_features ** -0.5)
            weight = {"kernel": self.param("kernel", _logical(init, self.axes), shape, self.dtype)}
        y = quant.matmul(x.astype(self.dtype), weight, out_dtype=self.out_dtype)
        if self.use_bias:
            bias = self.param("bias", _logical(nn.initializers.zeros, self.axes[1:]), self.out_shape, self.dtype)
            y = y + bias.astype(y.dtype)
        return y


class RMSNorm(nn.Module):
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", _logical(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.dtype)
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


# --- attention --------------------------------------------------------------------------------------------------


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, S, H, D], k/v [B, T, H, D], mask [B, S, T] bool (True = may attend) -> [B, S, H, D].

    Scores and softmax in float32; a fully masked row (a padding query) yields finite garbage, never NaN.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhst,bthd->bshd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


class Attention(nn.Module):
    config: QwenConfig
    dtype: Dtype
    quant_group: int | None

    @nn.compact
    def __call__(self, x, cos, sin, logn, mask, cache=None, write_start=None):
        """x [B, S, embed] -> ([B, S, embed], updated cache or None).

        cos/sin [B, S, head_dim]; logn [B, S]; mask [B, S, T] over the keys: this call's own S tokens when
        `cache` is None, else the T slots of `cache` after this call's keys are written at `write_start`.
        """
        c = self.config
        heads, hd = c.num_attention_heads, c.head_dim
        qkv = Linear(c.hidden_size, (3, heads, hd), ("embed", "qkv", "heads", "head_dim"), self.dtype,
                     self.quant_group, use_bias=True, name="c_attn")(x)  # [B, S, 3, H, hd]
        qkv = nn.with_logical_constraint(qkv, ("batch", "seq", "qkv", "heads", "head_dim"))
        q = (apply_rope(qkv[:, :, 0], cos, sin) * logn[:, :, None, None]).astype(self.dtype)
        k = apply_rope(qkv[:, :, 1], cos, sin).astype(self.dtype)
        v = qkv[:, :, 2]
        if cache is not None:
            cache = kv_cache.write(cache, k, v, write_start)
            k, v = kv_cache.read(cache)
            k = nn.with_logical_constraint(k, kv_cache.KV_AXES)
            v = nn.with_logical_constraint(v, kv_cache.KV_AXES)
        out = attend(q, k, v, mask)  # [B, S, H, hd]
        out = nn.with_logical_constraint(out, ("batch", "seq", "heads", "head_dim"))
        out = out.reshape(*out.shape[:2], heads * hd)
        out = Linear(heads * hd, (c.hidden_size,), ("heads", "embed"), self.dtype, self.quant_group,
                     name="c_proj")(out)
        return out, cache


class MLP(nn.Module):
    config: QwenConfig
    dtype: Dtype
    quant_group: int | None

    @nn.compact
    def __call__(self, x):
        c = self.config
        up_gate = Linear(c.hidden_size, (2, c.mlp_width), ("embed", "gate_up", "mlp"), self.dtype,
                         self.quant_group, name="w1w2")(x)  # [B, S, 2, mlp]
        up_gate = nn.with_logical_constraint(up_gate, ("batch", "seq", "gate_up", "mlp"))
        hidden = up_gate[:, :, 0] * jax.nn.silu(up_gate[:, :, 1])  # w2 is the gate
        return Linear(c.mlp_width, (c.hidden_size,), ("mlp", "embed"), self.dtype, self.quant_group,
                      name="c_proj")(hidden)


class Block(nn.Module):
    config: QwenConfig
    dtype: Dtype
    quant_group: int | None

    @nn.compact
    def __call__(self, x, cos, sin, logn, mask, cache=None, write_start=None):
        eps = self.config.layer_norm_epsilon
        attn_out, cache = Attention(self.config, self.dtype, self.quant_group, name="attn")(
            RMSNorm(eps, self.dtype, name="ln_1")(x), cos, sin, logn, mask, cache, write_start)
        h = x + attn_out
        out = h + MLP(self.config, self.dtype, self.quant_group, name="mlp")(RMSNorm(eps, self.dtype, name="ln_2")(h))
        return nn.with_logical_constraint(out, ("batch", "seq", "embed")), cache


class Qwen(nn.Module):
    """Token ids -> float32 logits, padded vocabulary rows masked to -inf; optionally through a KV cache."""

    config: QwenConfig
    dtype: Dtype = jnp.bfloat16
    quant_group: int | None = None  # group size of int8 linears; None = float linears

    @nn.compact
    def __call__(self, ids, positions, ntk_alpha, cache=None, logits_index=None):
        """ids, positions [B, S] int32; ntk_alpha [B] float32 (1 = no NTK scaling).

        cache: None for a plain forward, else a list of per-layer caches (qwen_jax.cache); this call's tokens
          are written at slots positions[:, 0] … positions[:, 0] + S - 1 of each row.
        logits_index [B]: if given, logits only at that index of each row (the last real token of a prefill).
        Returns (logits [B, S or 1, vocab_size] float32, updated cache or None).
        """
        c = self.config
        x = Embed(c.vocab_size, c.hidden_size, self.dtype, name="wte")(ids)
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
        cos, sin = rope_tables(positions, rope_base(c, ntk_alpha), c.head_dim)
        logn = logn_scale(positions, c.seq_length) if c.use_logn_attn else jnp.ones(positions.shape, jnp.float32)
        if cache is None:
            key_positions = positions
        else:
            key_positions = jnp.broadcast_to(jnp.arange(kv_cache.max_len(cache)), (ids.shape[0], kv_cache.max_len(cache)))
        mask = key_positions[:, None, :] <= positions[:, :, None]  # [B, S, T] causal by absolute position
        new_cache = []
        for i in range(c.num_hidden_layers):
            x, layer_cache = Block(c, self.dtype, self.quant_group, name=f"h_{i}")(
                x, cos, sin, logn, mask, None if cache is None else cache[i], positions[:, 0])
            new_cache.append(layer_cache)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)  # [B, 1, embed]
        x = RMSNorm(c.layer_norm_epsilon, self.dtype, name="ln_f")(x)
        logits = Linear(c.hidden_size, (c.vocab_size,), ("embed", "vocab"), self.dtype, None,
                        out_dtype=jnp.float32, name="lm_head")(x)
        logits = nn.with_logical_constraint(logits, ("batch", "seq", "vocab"))
        real = jnp.arange(c.vocab_size) < c.num_real_tokens
        return jnp.where(real, logits, -jnp.inf), (None if cache is None else new_cache)


class Embed(nn.Module):
    num_embeddings: int
    features: int
    dtype: Dtype

    @nn.compact
    def __call__(self, ids):
        table = self.param("embedding", _logical(nn.initializers.normal(1.0), ("vocab", "embed")),
                           (self.num_embeddings, self.features), self.dtype)
        return jnp.take(table, ids, axis=0)


def abstract_params(config: QwenConfig, dtype: Dtype, quant_group: int | None = None) -> Any:
    """Shapes, dtypes and logical axes of every parameter, without allocating any (`nn.LogicallyPartitioned` leaves)."""
    module = Qwen(config, dtype, quant_group)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    alpha = jax.ShapeDtypeStruct((1,), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), ids, ids, alpha)["params"]


@functools.partial(jax.jit, static_argnames=("module",))
def _forward(module: Qwen, params, ids, positions, ntk_alpha):
    return module.apply({"params": params}, ids, positions, ntk_alpha)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class QwenModel:
    """A loaded model: config, parameters on their devices, and the jitted entry points."""

    config: QwenConfig
    params: Any
    dtype: Dtype = jnp.bfloat16
    quant_group: int | None = None
    generation_config: dict = dataclasses.field(default_factory=dict)  # the checkpoint's generation defaults

    @property
    def module(self) -> Qwen:
        return Qwen(self.config, self.dtype, self.quant_group)

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
        return _forward(self.module, self.params, ids, positions, alpha)
