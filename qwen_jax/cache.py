"""The KV cache: keys and values [layers, batch, heads, max_len, head_dim], preallocated with static shapes.

Heads lead the slot axis so that one layer's keys (or values) of one (row, head) are a contiguous [max_len,
head_dim] matrix: decode attention reads them as the operand of a batched matmul over (row, head) as stored. With
slots leading (the model's [batch, seq, heads, head_dim] order) those matmuls need each layer's cache transposed,
a copy per layer per decode step: on an H100, 72B-Int8 decode took 5.3 ms/token more at ~3100 tokens of context
than at 1, for ~4 GB of int8 cache that takes ~1.5 ms to read.

A row's slot j holds the token at absolute position j. Rows advance independently (each writes at its own
position), so ragged batches and continuous batching need no re-layout. Slots past a row's current position may
hold stale values (padding of a bucketed prefill, or an earlier request): attention masks every slot j > query
position, and a slot is always rewritten before a query can reach it. Layers are stacked like the parameters,
and the layer loop updates its layer in place.

The cache holds keys and values in the model's dtype, or (`dtype=jnp.int8`) as int8 with one float16 scale per
(head, slot) — absmax over head_dim, rounded to nearest — which halves its memory: Qwen-72B has no grouped-query
attention, so a bf16 cache costs 2.5 MiB per token, and on one 80 GB GPU beside 68–71 GiB of weights that decides
the context length. Every access goes through `write` and `read`; attention applies the scales itself
(qwen_jax.attention.attend), so no dequantized copy of the cache is ever formed.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from qwen_jax import attention
from qwen_jax import sharding as sharding_lib
from qwen_jax.config import QwenConfig
from qwen_jax.kernels import int8_matmul

Cache = dict[str, jax.Array]  # "k", "v" [L, B, H, T, hd]; int8 caches also "k_scale", "v_scale" [L, B, H, T]
KV_AXES = ("layers", "batch", "kv_heads", "kv_len", "head_dim")
SCALE_DTYPE = jnp.float16
_INT8_MAX = 127


def is_quantized(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.int8


def _specs(config: QwenConfig, batch: int, max_len: int, dtype) -> dict[str, tuple[tuple[int, ...], Any, tuple]]:
    """name -> (shape, dtype, logical axes) of each array of a cache."""
    shape = (config.num_hidden_layers, batch, config.num_attention_heads, max_len, config.head_dim)
    specs = {"k": (shape, dtype, KV_AXES), "v": (shape, dtype, KV_AXES)}
    if is_quantized(dtype):
        specs.update({f"{name}_scale": (shape[:-1], SCALE_DTYPE, KV_AXES[:-1]) for name in ("k", "v")})
    return specs


def init_cache(config: QwenConfig, batch: int, max_len: int, dtype, mesh=None, rules=()) -> Cache:
    """Zeros, created directly in their shards when a mesh is given (never whole on one device first).

    `dtype`: the model's float dtype, or jnp.int8 for the quantized cache.
    """
    specs = _specs(config, batch, max_len, jnp.dtype(dtype))
    shardings = None if mesh is None else {
        name: sharding_lib.named_sharding(mesh, rules, axes) for name, (_, _, axes) in specs.items()}
    return jax.jit(lambda: {name: jnp.zeros(shape, dt) for name, (shape, dt, _) in specs.items()},
                   out_shardings=shardings)()


def cache_bytes(config: QwenConfig, batch: int, max_len: int, dtype) -> int:
    return sum(math.prod(shape) * jnp.dtype(dt).itemsize
               for shape, dt, _ in _specs(config, batch, max_len, jnp.dtype(dtype)).values())


class MemoryPreflightError(MemoryError):
    """A request that would not fit in device memory, refused before anything is allocated for it."""


# Kept free beyond a request's own arrays: XLA's GEMM autotuning and cuBLAS workspaces. 72B-Int8 on an H100 with an
# estimated 0.3 GiB to spare failed in autotuning ("RESOURCE_EXHAUSTED: Failed to get configs"), BENCHMARKS.md.
WORKSPACE_RESERVE = 2**30


def request_bytes_per_device(config: QwenConfig, batch: int, prompt_len: int, max_len: int, dtype, mesh=None,
                             rules=(), quant_group: int | None = None, kv_dtype=None,
                             prefill_chunk: int | None = None) -> dict[str, int]:
    """Device bytes a generation request adds on the fullest device, by what they hold, for a prompt prefilled in
    chunks of `prefill_chunk` tokens (default: in one piece):
      - its KV cache (`kv_dtype`, default `dtype`);
      - the prefill's attention scores: the first chunk's [batch, heads, chunk, chunk] float32 unless cuDNN's flash
        attention runs; later chunks attend over the cache with XLA: scores and probabilities [batch, heads,
        chunk, max_len] float32;
      - the prefill's widest activation, w1|w2's [batch, chunk, 2 × mlp] float32 product and its `dtype` cast;
      - on a GPU, one more copy of the cache's keys, for XLA's GEMM autotuner (below);
      - for int8 weights, a prefill's dequantized copy of the widest layer in `dtype` (prefills of more than
        int8_matmul.MAX_KERNEL_M tokens take the dequantize + cuBLAS path; XLA fuses the scale multiply into the
        one elementwise pass that writes it).
    """
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    shape, key_dtype, axes = _specs(config, batch, max_len, jnp.dtype(kv_dtype))["k"]
    split, devices = 1, 1
    if mesh is not None:
        devices = mesh.size
        shard = sharding_lib.named_sharding(mesh, rules, axes).shard_shape(shape)
        batch_axis, heads_axis = axes.index("batch"), axes.index("kv_heads")
        split = max(1, (batch * config.num_attention_heads) // (shard[batch_axis] * shard[heads_axis]))
    itemsize = jnp.dtype(dtype).itemsize
    chunk = min(prefill_chunk or prompt_len, prompt_len)
    need = {"KV cache": cache_bytes(config, batch, max_len, kv_dtype) // split}
    score_rows = 4 * batch * config.num_attention_heads * chunk  # float32 bytes per key of a chunk's scores
    scores = max(0 if attention.flash_applies(dtype, config.head_dim, devices) else score_rows * chunk,
                 2 * score_rows * max_len if chunk < prompt_len else 0)
    if scores:
        need["prefill attention scores"] = scores // split
    need["prefill activations"] = batch * chunk * 2 * config.mlp_width * (4 + itemsize) // split
    if jax.default_backend() == "gpu":
        # XLA's GEMM autotuner runs each attention GEMM on test copies of its operands, and the layer's cache slice
        # is fused into them, so the operand is a whole [L, …] cache array: on an H100 beside 72B-Int8 it failed
        # allocating exactly one int8 k stack (2.20 GiB at 3584 slots), BENCHMARKS.md.
        need["GEMM autotuning copy of the cache"] = math.prod(shape) * jnp.dtype(key_dtype).itemsize // split
    if quant_group and batch * chunk > int8_matmul.MAX_KERNEL_M:
        widest = config.hidden_size * 2 * config.mlp_width  # mlp/w1w2
        need["prefill dequantized layer"] = widest * itemsize // split
    return need


def preflight(config: QwenConfig, batch: int, prompt_len: int, max_len: int, dtype, mesh=None, rules=(),
              quant_group: int | None = None, kv_dtype=None, prefill_chunk: int | None = None,
              free_bytes: int | None = None) -> None:
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
    need = request_bytes_per_device(config, batch, prompt_len, max_len, dtype, mesh, rules, quant_group, kv_dtype,
                                    prefill_chunk)
    need["XLA workspace reserve"] = WORKSPACE_RESERVE
    if sum(need.values()) > free_bytes:
        parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in need.items())
        hint = "" if is_quantized(kv_dtype or dtype) else ", use the int8 KV cache (kv_dtype='int8')"
        raise MemoryPreflightError(
            f"this request needs {sum(need.values()) / 2**30:.2f} GiB per device ({parts}) for batch {batch}, "
            f"prompt {prompt_len} and {max_len} cache slots, but only {free_bytes / 2**30:.2f} GiB is free: "
            f"shorten the prompt or max_new_tokens, lower the batch{hint}, or shard over more devices")


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., hd] float -> (int8 [..., hd], float16 scales [...]) with x ≈ q * scale, |q| ≤ 127."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / _INT8_MAX
    scale = jnp.where(scale > 0, scale, 1.0).astype(SCALE_DTYPE)
    q = jnp.clip(jnp.round(x32 / scale.astype(jnp.float32)[..., None]), -_INT8_MAX, _INT8_MAX)
    return q.astype(jnp.int8), scale


def write(cache: Cache, layer: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array) -> Cache:
    """Store k/v [B, S, H, hd] of layer `layer` at slots [start[b], start[b] + S) of each row b (in place): one
    scatter per array, each (row, token) writing its H × hd values (int8 caches: its H scales) in one piece."""
    batch, seq = k.shape[:2]
    rows = jnp.arange(batch)[:, None]
    slots = start[:, None] + jnp.arange(seq)[None, :]  # [B, S]
    new = {"k": k, "v": v}
    if "k_scale" in cache:
        for name in ("k", "v"):
            new[name], new[f"{name}_scale"] = quantize(new[name])  # [B, S, H, hd] int8, [B, S, H]
    # The heads slice separates the index arrays rows and slots, so (NumPy's rule for separated index arrays) the
    # indexed view of [L, B, H, T, ...] is [B, S, H, ...]: the model's [B, S, H, hd] goes in as it is.
    return {name: cache[name].at[layer, rows, :, slots].set(value.astype(cache[name].dtype))
            for name, value in new.items()}


def read(cache: Cache, layer: jax.Array) -> dict[str, jax.Array]:
    """Layer `layer` of every array of the cache: "k", "v" [B, H, T, hd] (and "k_scale", "v_scale" [B, H, T])."""
    return {name: array[layer] for name, array in cache.items()}


def max_len(cache: Cache) -> int:
    return cache["k"].shape[KV_AXES.index("kv_len")]
