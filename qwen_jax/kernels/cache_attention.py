"""Attention over the KV cache on the GPU (Pallas, Triton lowering): the queries of one call against every cached
slot up to their own position, reading the stacked cache [L, B, H, T, ·] in place.

Through XLA the same attention is two batched GEMMs with softmax, mask and scale kernels between them, per layer,
over all T slots whatever the positions; and XLA's GEMM autotuner runs those GEMMs on a test copy of the whole
stacked cache array (2.2 GiB for 72B-Int8 at 3584 slots), which capped the context on one H100 (BENCHMARKS.md).
This kernel reads each (row, head)'s keys and values once, only up to the largest position among its queries.

Flash-decoding: program (row × head, query block, split) walks the slots of its split in blocks of `block_t`,
keeping the online-softmax state of its `block_s` query rows in registers: running max m, sum l and the
unnormalized output. `combine` (XLA, small) merges the splits' states. Splitting the slots keeps every SM busy when
a decode step has only B × H query rows (one per program); a chunked prefill has enough query blocks unsplit.

Int8 caches hold int32 words of 4 consecutive head_dim values (qwen_jax.cache says why). The kernel takes byte
plane p of a block of words — values p, p + 4, … of each slot — with two shifts, and q is permuted outside the
kernel into that plane order, so that each plane is a dense [block_t, head_dim / 4] operand of the score product.
The output comes in plane order too and `combine` permutes it back. Scales are applied to scores and to
probabilities, as in qwen_jax.attention.attend.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

WORD_VALUES = 4  # int8 values per int32 word of a quantized cache
_MIN_DOT = 16  # Triton's smallest dot dimension


@dataclasses.dataclass(frozen=True)
class Config:
    block_s: int  # query rows per program: power of 2 ≥ 16 (padded with masked rows)
    block_t: int  # slots per loop step: power of 2 ≥ 16
    num_warps: int = 4
    num_stages: int = 2
    min_programs: int = 528  # split the slots until row × head × query blocks × splits reaches this (4 per H100 SM)


def default_config(seq: int, n: int = 1) -> Config:
    """Measured on the H100 (benchmarks/attention_gpu.py --sweep, 8192 slots): at decode the configs within 10% of
    the best all had 4 warps or fewer, and 64 slots per step was among them for both caches; for a 256-token chunk
    4 warps won, with 64 slots for bf16 and 128 for int8 words (470 vs 689 µs)."""
    # Off a GPU, Pallas's interpreter runs programs one after another: no slot splits.
    min_programs = 528 if jax.default_backend() == "gpu" else 1
    if seq <= 16:
        return Config(block_s=16, block_t=64, min_programs=min_programs)
    return Config(block_s=64, block_t=128 if n > 1 else 64, min_programs=min_programs)


def planes(cache_dtype) -> int:
    """How many byte planes a cache word holds: 4 for int8 words (int32), 1 for float caches."""
    return WORD_VALUES if jnp.dtype(cache_dtype) == jnp.int32 else 1


def supported(dtype, head_dim: int, cache_dtype) -> bool:
    """Whether `attend` compiles for queries of `dtype` over a cache stored as `cache_dtype`: a GPU, 16-bit
    queries, a float cache of the same dtype or int8 words, and head planes of ≥ 16 values (Triton's dot)."""
    n = planes(cache_dtype)
    return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and jnp.dtype(cache_dtype) in (jnp.dtype(dtype), jnp.int32)
            and head_dim % n == 0 and head_dim // n >= _MIN_DOT)


def _to_planes(x: jax.Array, n: int) -> jax.Array:
    """[..., hd] -> [..., hd] ordered by plane: index p * (hd / n) + j holds value n * j + p."""
    return x if n == 1 else jnp.swapaxes(x.reshape(*x.shape[:-1], -1, n), -1, -2).reshape(x.shape)


def _from_planes(x: jax.Array, n: int) -> jax.Array:
    return x if n == 1 else jnp.swapaxes(x.reshape(*x.shape[:-1], n, -1), -1, -2).reshape(x.shape)


def _plane(words: jax.Array, p: int, n: int, dtype) -> jax.Array:
    """Byte p of each int32 word, sign-extended, in `dtype` (the block itself for a float cache)."""
    if n == 1:
        return words.astype(dtype)
    return ((words << (24 - 8 * p)) >> 24).astype(dtype)


def _kernel(layer_ref, pos_ref, q_ref, k_ref, v_ref, *refs, cfg: Config, n: int, seq: int, slots: int,
            heads: int, split_len: int, sm_scale: float):
    """layer_ref [1]; pos_ref [B, S] int32; q_ref [B, S, H, hd] (plane order); k_ref/v_ref [L, B, H, T, hd / n];
    refs: (ks_ref, vs_ref [L, B, H, T],) o_ref [splits, B, S, H, hd] float32, m_ref/l_ref [splits, B, S, H]."""
    quantized = len(refs) == 5
    ks_ref, vs_ref = refs[:2] if quantized else (None, None)
    o_ref, m_ref, l_ref = refs[-3:]
    bh, qb, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h, layer = bh // heads, bh % heads, layer_ref[0]
    bs, bt = cfg.block_s, cfg.block_t
    width = q_ref.shape[-1] // n
    rows = pl.ds(qb * bs, bs)
    row_ok = qb * bs + jnp.arange(bs) < seq
    pos = plgpu.load(pos_ref.at[b, rows], mask=row_ok, other=-1)  # [bs]; padding rows see no slot
    q_planes = [plgpu.load(q_ref.at[b, rows, h, pl.ds(p * width, width)], mask=row_ok[:, None], other=0)
                for p in range(n)]  # n × [bs, width]
    dtype = q_planes[0].dtype
    start = split * split_len
    limit = jnp.minimum(jnp.minimum(start + split_len, slots), jnp.max(pos) + 1)
    steps = jnp.maximum(limit - start + bt - 1, 0) // bt

    def step(i, carry):
        m, l, accs = carry
        t0 = start + i * bt
        t = t0 + jnp.arange(bt)
        t_ok = t < limit
        cached = pl.ds(t0, bt)
        k_words = plgpu.load(k_ref.at[layer, b, h, cached, :], mask=t_ok[:, None], other=0)  # [bt, width]
        s = sum(plgpu.dot(q_planes[p], _plane(k_words, p, n, dtype), trans_b=True) for p in range(n))  # [bs, bt]
        if quantized:
            s = s * plgpu.load(ks_ref.at[layer, b, h, cached], mask=t_ok, other=0).astype(jnp.float32)[None, :]
        s = jnp.where((t[None, :] <= pos[:, None]) & t_ok[None, :], s * sm_scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp(m - m_new)
        probs = jnp.exp(s - m_new[:, None])
        l = l * correction + jnp.sum(probs, axis=1)
        if quantized:
            probs = probs * plgpu.load(vs_ref.at[layer, b, h, cached], mask=t_ok, other=0).astype(jnp.float32)[None]
        v_words = plgpu.load(v_ref.at[layer, b, h, cached, :], mask=t_ok[:, None], other=0)
        probs = probs.astype(dtype)
        accs = tuple(acc * correction[:, None] + plgpu.dot(probs, _plane(v_words, p, n, dtype))
                     for p, acc in enumerate(accs))
        return m_new, l, accs

    m0 = jnp.full((bs,), jnp.finfo(jnp.float32).min, jnp.float32)  # finite: exp(m - m_new) never sees inf - inf
    init = (m0, jnp.zeros((bs,), jnp.float32), tuple(jnp.zeros((bs, width), jnp.float32) for _ in range(n)))
    m, l, accs = jax.lax.fori_loop(0, steps, step, init)
    for p, acc in enumerate(accs):
        plgpu.store(o_ref.at[split, b, rows, h, pl.ds(p * width, width)], acc, mask=row_ok[:, None])
    plgpu.store(m_ref.at[split, b, rows, h], m, mask=row_ok)
    plgpu.store(l_ref.at[split, b, rows, h], l, mask=row_ok)


def combine(out: jax.Array, m: jax.Array, l: jax.Array, n: int, dtype) -> jax.Array:
    """Merge the splits' softmax states: out [splits, B, S, H, hd] (plane order), m/l [splits, B, S, H]
    -> [B, S, H, hd] `dtype`. A row that saw no slot (padding) gets zeros, never NaN."""
    weight = jnp.exp(m - jnp.max(m, axis=0))
    total = jnp.sum(weight * l, axis=0)
    acc = jnp.sum(weight[..., None] * out, axis=0) / jnp.where(total > 0, total, 1.0)[..., None]
    return _from_planes(acc, n).astype(dtype)


def _split(programs: int, slots: int, cfg: Config) -> tuple[int, int]:
    """(splits, slots per split, a multiple of block_t) for `programs` programs per split."""
    splits = max(1, min(pl.cdiv(cfg.min_programs, programs), pl.cdiv(slots, cfg.block_t)))
    split_len = pl.cdiv(pl.cdiv(slots, splits), cfg.block_t) * cfg.block_t
    return pl.cdiv(slots, split_len), split_len


def partials_bytes(batch: int, seq: int, heads: int, head_dim: int, slots: int, cache_dtype) -> int:
    """Device bytes of `attend`'s per-split float32 softmax states (output, max, sum) for these shapes."""
    cfg = default_config(seq, planes(cache_dtype))
    splits, _ = _split(batch * heads * pl.cdiv(seq, cfg.block_s), slots, cfg)
    return 4 * splits * batch * seq * heads * (head_dim + 2)


def attend(q: jax.Array, positions: jax.Array, k: jax.Array, v: jax.Array, layer, k_scale: jax.Array | None = None,
           v_scale: jax.Array | None = None, *, config: Config | None = None, interpret: bool = False) -> jax.Array:
    """q [B, S, H, hd], positions [B, S] int32; the whole stacked cache k/v [L, B, H, T, hd] (float, q's dtype) or
    int32 words [L, B, H, T, hd / 4] with k_scale/v_scale [L, B, H, T]; `layer` an int scalar (may be traced).
    Query (b, i) attends to slots 0 … positions[b, i] of row b in layer `layer` -> [B, S, H, hd] in q's dtype.

    `interpret=True` runs in Pallas's interpreter (CPU tests).
    """
    batch, seq, heads, head_dim = q.shape
    slots = k.shape[3]
    n = planes(k.dtype)
    cfg = config or default_config(seq, n)
    query_blocks = pl.cdiv(seq, cfg.block_s)
    splits, split_len = _split(batch * heads * query_blocks, slots, cfg)
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    operands = [layer, positions.astype(jnp.int32), _to_planes(q, n), k, v]
    if k_scale is not None:
        operands += [k_scale, v_scale]
    state = (splits, batch, seq, heads)
    out, m, l = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, n=n, seq=seq, slots=slots, heads=heads, split_len=split_len,
                          sm_scale=head_dim ** -0.5),
        grid=(batch * heads, query_blocks, splits),
        out_shape=[jax.ShapeDtypeStruct((*state, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct(state, jnp.float32), jax.ShapeDtypeStruct(state, jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="cache_attention_int8" if n > 1 else "cache_attention",
    )(*operands)
    return combine(out, m, l, n, q.dtype)
