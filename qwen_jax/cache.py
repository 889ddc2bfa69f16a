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
the context length. Int8 values are stored as int32 words of 4 consecutive head_dim values: Pallas's Triton
lowering indexes an array of 2–4 GiB with signed 32-bit element offsets, which wrap past 2**31 elements for a
1-byte type (72B's int8 key stack is 2–4 GiB between 3.3k and 6.5k slots), and never for a 4-byte one.
Every access goes through `write`, `read` and `attend`; attention applies the scales itself, so no dequantized
copy of the cache is ever formed.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen_jax import attention
from qwen_jax import sharding as sharding_lib
from qwen_jax.config import QwenConfig
from qwen_jax.kernels import cache_attention, int8_matmul

# "k", "v" [L, B, H, T, hd] (int8 caches: int32 words [L, B, H, T, hd / 4]); int8 caches also "k_scale", "v_scale"
# [L, B, H, T]
Cache = dict[str, jax.Array]
KV_AXES = ("layers", "batch", "kv_heads", "kv_len", "head_dim")
SCALE_DTYPE = jnp.float16
_INT8_MAX = 127
_WORD = jnp.int32  # storage of int8 values (module docstring)


def _words(head_dim: int) -> int:
    if head_dim % cache_attention.WORD_VALUES:
        raise ValueError(f"the int8 KV cache packs {cache_attention.WORD_VALUES} values per word: head_dim "
                         f"{head_dim} is not a multiple")
    return head_dim // cache_attention.WORD_VALUES


def pack(q: jax.Array) -> jax.Array:
    """int8 [..., hd] -> int32 words [..., hd / 4]; value 4j + p is byte p (from the least significant) of word j."""
    return jax.lax.bitcast_convert_type(q.reshape(*q.shape[:-1], -1, cache_attention.WORD_VALUES), _WORD)


def unpack(words: jax.Array) -> jax.Array:
    """int32 words [..., hd / 4] -> int8 [..., hd]."""
    return jax.lax.bitcast_convert_type(words, jnp.int8).reshape(*words.shape[:-1], -1)


def is_quantized(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.int8


def _specs(config: QwenConfig, batch: int, max_len: int, dtype) -> dict[str, tuple[tuple[int, ...], Any, tuple]]:
    """name -> (shape, dtype, logical axes) of each array of a cache."""
    shape = (config.num_hidden_layers, batch, config.num_attention_heads, max_len, config.head_dim)
    if is_quantized(dtype):
        words = (*shape[:-1], _words(config.head_dim))
        specs = {name: (words, _WORD, KV_AXES) for name in ("k", "v")}
        specs.update({f"{name}_scale": (shape[:-1], SCALE_DTYPE, KV_AXES[:-1]) for name in ("k", "v")})
    else:
        specs = {name: (shape, dtype, KV_AXES) for name in ("k", "v")}
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


def _cache_shards(config: QwenConfig, batch: int, max_len: int, kv_dtype, mesh, rules) -> int:
    """Into how many shards the mesh splits a cache's (row, head) pairs: the request's arrays shrink alike."""
    if mesh is None:
        return 1
    shape, _, axes = _specs(config, batch, max_len, jnp.dtype(kv_dtype))["k"]
    shard = sharding_lib.named_sharding(mesh, rules, axes).shard_shape(shape)
    return max(1, (batch * config.num_attention_heads) // (shard[axes.index("batch")] * shard[axes.index("kv_heads")]))


def cache_bytes_per_device(config: QwenConfig, batch: int, max_len: int, kv_dtype, mesh=None, rules=()) -> int:
    shards = _cache_shards(config, batch, max_len, kv_dtype, mesh, rules)
    return cache_bytes(config, batch, max_len, kv_dtype) // shards


def request_bytes_per_device(config: QwenConfig, batch: int, prompt_len: int, max_len: int, dtype, mesh=None,
                             rules=(), quant_group: int | None = None, kv_dtype=None,
                             prefill_chunk: int | None = None) -> dict[str, int]:
    """Device bytes a generation request adds on the fullest device, by what they hold, for a prompt prefilled in
    chunks of `prefill_chunk` tokens (default: in one piece):
      - its KV cache (`kv_dtype`, default `dtype`);
      - the prefill's attention scores: the first chunk's [batch, heads, chunk, chunk] float32 unless cuDNN's flash
        attention runs; later chunks attend over the cache: with the kernel (`kernel_applies`), its per-split
        softmax states, else XLA's scores and probabilities [batch, heads, chunk, max_len] float32;
      - the prefill's widest activation, w1|w2's [batch, chunk, 2 × mlp] float32 product and its `dtype` cast;
      - on a GPU without the kernel, one more copy of the cache's keys, for XLA's GEMM autotuner (below);
      - for int8 weights, a prefill's dequantized copy of the widest layer in `dtype` (prefills of more than
        int8_matmul.MAX_KERNEL_M tokens take the dequantize + cuBLAS path; XLA fuses the scale multiply into the
        one elementwise pass that writes it).
    """
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    shape, key_dtype, _ = _specs(config, batch, max_len, jnp.dtype(kv_dtype))["k"]
    split = _cache_shards(config, batch, max_len, kv_dtype, mesh, rules)
    itemsize = jnp.dtype(dtype).itemsize
    chunk = min(prefill_chunk or prompt_len, prompt_len)
    need = {"KV cache": cache_bytes(config, batch, max_len, kv_dtype) // split}
    heads, head_dim = config.num_attention_heads, config.head_dim
    kernel = kernel_applies(dtype, head_dim, kv_dtype)
    score_rows = 4 * batch * heads * chunk  # float32 bytes per key of a chunk's scores
    over_cache = (cache_attention.partials_bytes(batch, chunk, heads, head_dim, max_len, key_dtype) if kernel
                  else 2 * score_rows * max_len)
    scores = max(0 if attention.flash_applies(dtype, head_dim) else score_rows * chunk,
                 over_cache if chunk < prompt_len else 0)
    if scores:
        need["prefill attention scores"] = scores // split
    need["prefill activations"] = batch * chunk * 2 * config.mlp_width * (4 + itemsize) // split
    if jax.default_backend() == "gpu" and not kernel:
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
              resident: dict[str, int] | None = None, free_bytes: int | None = None) -> None:
    """Refuse a request that cannot fit, with the numbers, instead of an out-of-memory error from XLA.

    `resident`: named bytes per device that must stay allocated beside the request (not yet allocated either),
    e.g. the batch engine's own cache. `free_bytes` defaults to the first device's limit minus its use, where the
    backend reports them (GPUs/TPUs).
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
    need.update(resident or {})
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
            q, new[f"{name}_scale"] = quantize(new[name])  # [B, S, H, hd] int8, [B, S, H]
            new[name] = pack(q)
    # The heads slice separates the index arrays rows and slots, so (NumPy's rule for separated index arrays) the
    # indexed view of [L, B, H, T, ...] is [B, S, H, ...]: the model's [B, S, H, hd] goes in as it is.
    return {name: cache[name].at[layer, rows, :, slots].set(value.astype(cache[name].dtype))
            for name, value in new.items()}


def read(cache: Cache, layer: jax.Array) -> dict[str, jax.Array]:
    """Layer `layer` of every array of the cache: "k", "v" [B, H, T, hd] (int8 for an int8 cache, with "k_scale",
    "v_scale" [B, H, T]). A copy: the XLA path's reader, and the tests'."""
    out = {name: array[layer] for name, array in cache.items()}
    if "k_scale" in cache:
        out["k"], out["v"] = unpack(out["k"]), unpack(out["v"])
    return out


def kernel_applies(dtype, head_dim: int, kv_dtype) -> bool:
    """Whether `attend` runs the Pallas kernel (qwen_jax.kernels.cache_attention): a GPU and a 16-bit model (under
    a mesh, on each device's rows and heads, `_attend_local`)."""
    kv_dtype = _WORD if is_quantized(kv_dtype) else kv_dtype
    return cache_attention.supported(dtype, head_dim, kv_dtype)


def attend(cache: Cache, layer: jax.Array, q: jax.Array, positions: jax.Array) -> jax.Array:
    """q [B, S, H, hd] at positions [B, S] attends to slots 0 … positions[b, i] of row b of layer `layer`
    -> [B, S, H, hd] in q's dtype.

    On a GPU the kernel reads the stacked cache in place (under a mesh, each device its own rows and heads);
    elsewhere (the CPU, rules that split slots or layers) XLA attends over one layer's copy under the causal mask
    by absolute position.
    """
    if kernel_applies(q.dtype, q.shape[-1], jnp.int8 if "k_scale" in cache else cache["k"].dtype):
        if not sharding_lib.under_mesh():
            return cache_attention.attend(q, positions, cache["k"], cache["v"], layer, cache.get("k_scale"),
                                          cache.get("v_scale"))
        out = _attend_local(cache, layer, q, positions)
        if out is not None:
            return out
    # k/v [B, H, T, hd] and scales [B, H, T]: the cache's axes after `layers` (scales stop before head_dim)
    kv = {name: nn.with_logical_constraint(a, KV_AXES[1:a.ndim + 1]) for name, a in read(cache, layer).items()}
    mask = jnp.arange(max_len(cache))[None, None, :] <= positions[:, :, None]  # [B, S, T]
    return attention.attend(q, kv["k"], kv["v"], mask, kv.get("k_scale"), kv.get("v_scale"))


def _attend_local(cache: Cache, layer: jax.Array, q: jax.Array, positions: jax.Array) -> jax.Array | None:
    """The kernel on each device's cache rows and heads (queries split to match), or None where the rules split
    layers, slots or head_dim (a query must see all its slots)."""
    specs = sharding_lib.local_specs([KV_AXES, KV_AXES[:4]])
    if specs is None:
        return None
    kv_spec, scale_spec = specs
    if any(kv_spec[KV_AXES.index(name)] is not None for name in ("layers", "kv_len", "head_dim")):
        return None
    rows, heads = kv_spec[KV_AXES.index("batch")], kv_spec[KV_AXES.index("kv_heads")]
    q_spec, pos_spec = P(rows, None, heads, None), P(rows, None)
    scales = [cache[name] for name in ("k_scale", "v_scale") if name in cache]

    def local(q, positions, k, v, *rest):
        *scales, layer = rest
        return cache_attention.attend(q, positions, k, v, layer, *scales)

    return sharding_lib.run_local(local, [q, positions, cache["k"], cache["v"], *scales, layer],
                                  [q_spec, pos_spec, kv_spec, kv_spec, *[scale_spec] * len(scales), P()], q_spec)


def max_len(cache: Cache) -> int:
    return cache["k"].shape[KV_AXES.index("kv_len")]
