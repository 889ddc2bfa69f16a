"""Attention math: pure functions of queries, keys and values (no parameters).

Two cases, both with queries and output [batch, seq, heads, head_dim]:
  - `causal_self_attention`: a prefill (or a plain forward), whose tokens are the whole context so far and attend
    only to each other. On a GPU this is cuDNN's fused flash attention: it never forms the [B, H, S, S] scores
    (313 vs 39 TFLOP/s for XLA at 4k tokens on the H100, ../shared/MEASUREMENTS.md) and needs no memory for them,
    which is what lets a long prompt fit beside 72B's weights.
  - `attend`: queries against keys/values of one layer of the KV cache, under an explicit mask: the XLA path of
    qwen_jax.cache.attend (CPU, meshes of several devices; a GPU runs qwen_jax.kernels.cache_attention). Keys and values
    come in the cache's layout [batch, heads, slots, head_dim] and are consumed in it: both products are batched
    matmuls over (batch, head) with each head's [slots, head_dim] matrix as stored, so no copy of the cache is formed.
    They may be int8 with one scale per (head, token): the scales are applied to the scores and to the
    probabilities, never to a dequantized copy of the cache (exact algebra: q·(s_k k) = s_k (q·k),
    Σ p (s_v v) = Σ (p s_v) v).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax import quant
from qwen_jax import sharding as sharding_lib

FLASH_HEAD_DIMS = (64, 128)  # head sizes cuDNN's fused attention handles (Qwen's is 128)


def flash_applies(dtype, head_dim: int) -> bool:
    """Whether `causal_self_attention` runs cuDNN's fused kernel: a GPU, 16-bit, a head size it handles (under a
    mesh, on each device's rows and heads)."""
    return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim in FLASH_HEAD_DIMS)


def _flash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def causal_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
    """q, k, v [B, S, H, D], positions [B, S] -> [B, S, H, D]: token i of a row attends to tokens 0..i of the row.

    The XLA path masks by position; cuDNN's causal mask by index is the same because a row's positions are
    consecutive. Padding after a row's last real token is never seen by its real tokens. Under a mesh the fused
    kernel runs on each device's rows and heads (a row's tokens stay together), as the rules split them.
    """
    if flash_applies(q.dtype, q.shape[-1]):
        if not sharding_lib.under_mesh():
            return _flash(q, k, v)
        specs = sharding_lib.local_specs([("batch", None, "act_heads", None)])
        if specs is not None and sharding_lib.local_shape(q.shape, specs[0]) is not None:
            return sharding_lib.run_local(_flash, [q, k, v], specs * 3, specs[0])
    mask = positions[:, None, :] <= positions[:, :, None]  # [B, S, S]
    # attend takes the cache's [B, H, S, D]; these are only this call's tokens, so the transpose is cheap
    return attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, k_scale: jax.Array | None = None,
           v_scale: jax.Array | None = None) -> jax.Array:
    """q [B, S, H, D], k/v [B, H, T, D] (the cache's layout; int8 when scales [B, H, T] are given), mask [B, S, T]
    bool (True = may attend) -> [B, S, H, D] in q's dtype.

    Scores and softmax in float32; a fully masked row (a padding query) yields finite garbage, never NaN.
    """
    dtype = q.dtype
    # (b, h) are the batch dimensions of both products and lead k/v: each is a batched [S, D]·[T, D]ᵀ, [S, T]·[T, D]
    scores = jnp.einsum("bshd,bhtd->bhst", q, k.astype(dtype), precision=quant.precision(dtype),
                        preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, :].astype(jnp.float32)
    scores = jnp.where(mask[:, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, H, S, T]
    if v_scale is not None:
        probs = probs * v_scale[:, :, None, :].astype(jnp.float32)
    return jnp.einsum("bhst,bhtd->bshd", probs.astype(dtype), v.astype(dtype), precision=quant.precision(dtype),
                      preferred_element_type=jnp.float32).astype(dtype)
