"""The KV cache: per layer, keys and values [batch, max_len, heads, head_dim], preallocated with static shapes.

A row's slot j holds the token at absolute position j. Rows advance independently (each writes at its own
position), so ragged batches and, later, continuous batching need no re-layout. Slots past a row's current
position may hold stale values (padding of a bucketed prefill, or an earlier request): attention masks every
slot j > query position, and a slot is always rewritten before a query can reach it.

Every access goes through `write` and `read`, so a quantized cache (int8 values + per-slot scales) can
replace the bfloat16 one here without touching the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.config import QwenConfig

LayerCache = dict[str, jax.Array]
KV_AXES = ("batch", "kv_len", "heads", "head_dim")


def init_cache(config: QwenConfig, batch: int, max_len: int, dtype) -> list[LayerCache]:
    shape = (batch, max_len, config.num_attention_heads, config.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_hidden_layers)]


def cache_bytes(config: QwenConfig, batch: int, max_len: int, dtype) -> int:
    per_layer = 2 * batch * max_len * config.num_attention_heads * config.head_dim * jnp.dtype(dtype).itemsize
    return config.num_hidden_layers * per_layer


def write(layer: LayerCache, k: jax.Array, v: jax.Array, start: jax.Array) -> LayerCache:
    """Store k/v [B, S, H, hd] at slots [start[b], start[b] + S) of each row b."""

    def put(buffer, update, row_start):  # buffer [T, H, hd], update [S, H, hd]
        return jax.lax.dynamic_update_slice(buffer, update.astype(buffer.dtype), (row_start, 0, 0))

    return {"k": jax.vmap(put)(layer["k"], k, start), "v": jax.vmap(put)(layer["v"], v, start)}


def read(layer: LayerCache) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, T, H, hd] in the cache's compute dtype."""
    return layer["k"], layer["v"]


def max_len(cache: list[LayerCache]) -> int:
    return cache[0]["k"].shape[1]
