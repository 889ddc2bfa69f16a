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
from qwen_jax.kernels import int8_matmul

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


class MemoryPreflightError(MemoryError):
    """A request that would not fit in device memory, refused before anything is allocated for it."""


def request_bytes_per_device(config: QwenConfig, batch: int, prompt_len: int, max_len: int, dtype, mesh=None,
                             rules=(), quant_group: int | None = None) -> dict[str, int]:
    """Device bytes a generation request adds on the fullest device: its KV cache, the prefill's attention scores
    ([batch, heads, prompt, max_len] float32, the largest temporary of the XLA attention path) and, for int8
    weights, the prefill's dequantized copy of the widest layer (float32 products, then the dot's bf16 operand:
    prefills of more than int8_matmul.MAX_KERNEL_M tokens take the dequantize + cuBLAS path)."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_attention_heads, config.head_dim)
    split = 1
    if mesh is not None:
        shard = sharding_lib.named_sharding(mesh, rules, KV_AXES).shard_shape(shape)
        split = max(1, (batch * config.num_attention_heads) // (shard[1] * shard[3]))
    scores = 4 * batch * config.num_attention_heads * prompt_len * max_len
    need = {"KV cache": cache_bytes(config, batch, max_len, dtype) // split, "prefill attention scores": scores // split}
    if quant_group and batch * prompt_len > int8_matmul.MAX_KERNEL_M:
        widest = config.hidden_size * 2 * config.mlp_width  # mlp/w1w2
        need["prefill dequantized layer"] = widest * (4 + jnp.dtype(dtype).itemsize) // split
    return need


def preflight(config: QwenConfig, batch: int, prompt_len: int, max_len: int, dtype, mesh=None, rules=(),
              quant_group: int | None = None, free_bytes: int | None = None) -> None:
    """Refuse a request that cannot fit, with the numbers, instead of an out-of-memory error from XLA.

    `free_bytes` defaults to the first device's limit minus its use, where the backend reports them (GPUs/TPUs).
    """
    if free_bytes is None:
        device = jax.local_devices()[0] if mesh is None else next(
            d for d in mesh.devices.flat if d.process_index == jax.process_index())
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return  # the host CPU backend does not report memory
        free_bytes = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    need = request_bytes_per_device(config, batch, prompt_len, max_len, dtype, mesh, rules, quant_group)
    if sum(need.values()) > free_bytes:
        parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in need.items())
        raise MemoryPreflightError(
            f"this request needs {sum(need.values()) / 2**30:.2f} GiB per device ({parts}) for batch {batch}, "
            f"prompt {prompt_len} and {max_len} cache slots, but only {free_bytes / 2**30:.2f} GiB is free: "
            "shorten the prompt or max_new_tokens, lower the batch, or shard over more devices")


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
