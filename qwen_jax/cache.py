"""The KV cache: keys and values [layers, batch, max_len, heads, head_dim], preallocated with static shapes.

A row's slot j holds the token at absolute position j. Rows advance independently (each writes at its own
position), so ragged batches and continuous batching need no re-layout. Slots past a row's current position may
hold stale values (padding of a bucketed prefill, or an earlier request): attention masks every slot j > query
position, and a slot is always rewritten before a query can reach it. Layers are stacked like the parameters,
and the layer loop updates its layer in place.

Every access goes through `write` and `read`, so a quantized cache (int8 values + per-slot scales) can
replace the bfloat16 one here without touching the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax import sharding as sharding_lib
from qwen_jax.config import QwenConfig

Cache = dict[str, jax.Array]
KV_AXES = ("layers", "batch", "kv_len", "kv_heads", "head_dim")


def init_cache(config: QwenConfig, batch: int, max_len: int, dtype, mesh=None, rules=()) -> Cache:
    """Zeros, created directly in their shards when a mesh is given (never whole on one device first)."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_attention_heads, config.head_dim)
    sharding = None if mesh is None else sharding_lib.named_sharding(mesh, rules, KV_AXES)
    return jax.jit(lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}, out_shardings=sharding)()


def cache_bytes(config: QwenConfig, batch: int, max_len: int, dtype) -> int:
    per_layer = 2 * batch * max_len * config.num_attention_heads * config.head_dim * jnp.dtype(dtype).itemsize
    return config.num_hidden_layers * per_layer


def write(cache: Cache, layer: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array) -> Cache:
    """Store k/v [B, S, H, hd] of layer `layer` at slots [start[b], start[b] + S) of each row b (in place)."""
    batch, seq = k.shape[:2]
    rows = jnp.arange(batch)[:, None]
    slots = start[:, None] + jnp.arange(seq)[None, :]  # [B, S]
    return {name: cache[name].at[layer, rows, slots].set(new.astype(cache[name].dtype))
            for name, new in (("k", k), ("v", v))}


def read(cache: Cache, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, T, H, hd] of layer `layer`, in the cache's compute dtype."""
    return cache["k"][layer], cache["v"][layer]


def max_len(cache: Cache) -> int:
    return cache["k"].shape[2]
