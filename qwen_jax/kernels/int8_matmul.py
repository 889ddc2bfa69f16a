"""Fused weight-only int8 matmul for the GPU (Pallas, Triton lowering).

    y [M, *N] = x [M, K] @ W,   W[k, n] = qvalue[k, n] * scales[k // g, n]

with qvalue int8 [K, *N] and scales float16 [K // g, *N] in qwen_jax.quant's layout (K-major, group-contiguous).
Decode (small M) is bound by reading the weights, so the kernel reads each int8 weight and each scale once,
converts in registers and accumulates in float32; it never writes a dequantized copy.

One program owns a [block_m, block_n] output tile and one of `k_splits` contiguous K ranges. It walks its range
`groups_per_step` quantization groups (g rows each) per loop step; per group it forms x[:, g] @ q[g, :] with q
converted to x's dtype (exact: |q| ≤ 128) and multiplies that [block_m, block_n] partial product by the group's
scales row. That is exact algebra and costs M×N multiplies per group instead of dequantizing g×N weights.
The per-group product takes one of two forms (`Config.form`):
  "xw":  dot(x, q)         tensor cores (x padded to block_m ≥ 16 rows)
  "fma": Σ_k x[:, k] q[k]  no tensor cores, for block_m ≤ 4 rows
(A third form, dot(qᵀ, xᵀ)ᵀ with the weight as the A operand, was slower than "xw" at all four 72B shapes on the
H100 at M = 16, by 5–40%, and was dropped.)
With k_splits > 1 the K ranges write float32 partial sums [k_splits, M, N] that one small XLA reduction adds
(and casts): splitting K keeps enough programs in flight when N / block_n alone would leave SMs idle.

`layer` lets a stacked weight [L, K, *N] be used in place (e.g. under lax.scan): the kernel offsets its pointers
by the layer index instead of XLA copying a dynamic slice of the stack for the custom call.

Pallas's Triton lowering indexes an array of at most 4 GiB with 32-bit offsets, signed in the address arithmetic,
so offsets past 2 GiB wrap (seen on the H100 with jax 0.11.2: wrong results for a 3.2 GB stack). An array in
(2 GiB, 4 GiB] is therefore never indexed by the kernel: a stack that size is read through an XLA slice of its
layer, and a single weight that size is not `supported`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

FORMS = ("xw", "fma")


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int  # output rows per program: power of 2, ≥ 16 for "xw" (tl.dot's minimum), ≤ 4 for "fma"
    block_n: int  # output columns per program: power of 2 dividing N
    groups_per_step: int  # quantization groups per loop step: more bytes in flight per step, more shared memory
    k_splits: int  # programs along K; each sums K / k_splits rows
    num_warps: int = 4
    num_stages: int = 3  # Triton's software-pipelining depth of the K loop
    form: str = "xw"

    def check(self, m_padded: int, k: int, n: int, group: int) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form {self.form!r} not in {FORMS}")
        if (self.form == "fma") != (self.block_m <= 4) or m_padded % self.block_m:
            raise ValueError(f"{self}: block_m must be ≤ 4 exactly for 'fma' and divide the padded M={m_padded}")
        if self.form == "fma" and group % _FMA_ROWS:
            raise ValueError(f"{self}: the 'fma' form needs a group size that is a multiple of {_FMA_ROWS}")
        if n % self.block_n or (k // group) % (self.k_splits * self.groups_per_step):
            raise ValueError(f"{self}: block_n must divide N={n}, k_splits × groups_per_step the {k // group} groups")


_FMA_ROWS = 32  # rows per broadcast product in the "fma" form: [bm, 32, bn] float32 stays within registers


def _load_weight(q_ref, layer, rows):
    # Each weight byte is read once: evict it first so that x and the scales stay in L2.
    return plgpu.load(q_ref.at[layer, rows, :], eviction_policy="evict_first")


def _fma_group(x_ref, q_ref, layer, start, group):
    """Σ_k x[:, k] q[k, :] over rows [start, start + group) without tensor cores -> [bm, bn] float32."""
    part = None
    for c in range(0, group, _FMA_ROWS):
        rows = pl.ds(pl.multiple_of(start + c, _FMA_ROWS), _FMA_ROWS)
        x = x_ref[:, rows].astype(jnp.float32)  # [bm, 32]
        q = _load_weight(q_ref, layer, rows).astype(jnp.float32)  # [32, bn]
        term = jnp.sum(x[:, :, None] * q[None, :, :], axis=1)
        part = term if part is None else part + term
    return part


def _kernel(layer_ref, x_ref, q_ref, s_ref, o_ref, *, cfg: Config, group: int, steps: int):
    """layer_ref [1] int32; x_ref [bm, Ks]; q_ref [L, Ks, bn] int8; s_ref [L, Ks // g, bn]; o_ref [bm, bn]."""
    layer = layer_ref[0]
    f32 = jnp.float32

    def step(i, acc):
        for j in range(cfg.groups_per_step):  # unrolled: all groups' loads are issued before their math
            grp = i * cfg.groups_per_step + j
            s = s_ref[layer, grp, :].astype(f32)  # [bn]
            if cfg.form == "fma":
                part = _fma_group(x_ref, q_ref, layer, grp * group, group)
            else:
                rows = pl.ds(pl.multiple_of(grp * group, group), group)
                x = x_ref[:, rows]  # [bm, g]
                q = _load_weight(q_ref, layer, rows).astype(x.dtype)  # [g, bn]
                part = jnp.dot(x, q, preferred_element_type=f32)
            acc += part * s[None, :]
        return acc

    acc = lax.fori_loop(0, steps, step, jnp.zeros((cfg.block_m, cfg.block_n), f32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _pallas_matmul(x, q, s, layer, cfg: Config, out_dtype, interpret: bool):
    """x [Mp, K], q [L, K, N] int8, s [L, K // g, N], layer [1] int32 -> [Mp, N] out_dtype (Mp % block_m == 0)."""
    mp, k = x.shape
    n_layers, _, n = q.shape
    group = k // s.shape[1]
    cfg.check(mp, k, n, group)
    bm, bn, splits = cfg.block_m, cfg.block_n, cfg.k_splits
    k_split = k // splits
    partial = splits > 1
    y = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, group=group, steps=k_split // (group * cfg.groups_per_step)),
        grid=(n // bn, mp // bm, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda j, i, h: (0,)),
            pl.BlockSpec((bm, k_split), lambda j, i, h: (i, h)),
            pl.BlockSpec((n_layers, k_split, bn), lambda j, i, h: (0, h, j)),
            pl.BlockSpec((n_layers, k_split // group, bn), lambda j, i, h: (0, h, j)),
        ],
        out_specs=pl.BlockSpec((None, bm, bn), lambda j, i, h: (h, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, n), jnp.float32 if partial else out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"int8_matmul_{cfg.form}",
    )(layer, x, q, s)
    return y.sum(0).astype(out_dtype) if partial else y[0]


# Best measured configs, keyed by (K, N, M bucket): Qwen-72B's four layer shapes on the H100 with jax 0.11.2, the
# fastest of two sweeps' final timings (benchmarks/int8_matmul.py --sweep; BENCHMARKS.md).
_TUNED: dict[tuple[int, int, int], Config] = {
    (8192, 24576, 1): Config(1, 256, 2, 16, 4, 3, "fma"),
    (8192, 24576, 4): Config(16, 128, 1, 2, 4, 3),
    (8192, 24576, 16): Config(16, 128, 1, 2, 4, 4),
    (8192, 24576, 64): Config(64, 128, 1, 2, 4, 3),  # not swept at this shape: w1w2's winner (same K)
    (8192, 49152, 1): Config(1, 256, 2, 8, 4, 3, "fma"),
    (8192, 49152, 4): Config(16, 128, 1, 1, 4, 4),
    (8192, 49152, 16): Config(16, 128, 1, 1, 4, 3),
    (8192, 49152, 64): Config(64, 128, 1, 2, 4, 3),
    (8192, 8192, 1): Config(16, 128, 1, 4, 8, 3),
    (8192, 8192, 4): Config(16, 128, 1, 4, 8, 3),
    (8192, 8192, 16): Config(16, 128, 1, 8, 8, 4),
    (8192, 8192, 64): Config(64, 128, 1, 4, 8, 3),
    (24576, 8192, 1): Config(16, 128, 1, 4, 8, 3),
    (24576, 8192, 4): Config(16, 128, 1, 4, 8, 3),
    (24576, 8192, 16): Config(16, 128, 1, 8, 4, 3),
    (24576, 8192, 64): Config(64, 128, 1, 4, 4, 3),
}
_M_BUCKETS = (1, 4, 16, 64)
# Above this many rows dequantize-to-bf16 + XLA's dot (cuBLAS) is used: at M = 2048 it measured about twice as fast
# as the kernel at every 72B shape, while at M = 64 the kernel measured 1.2-3.4x faster (BENCHMARKS.md).
MAX_KERNEL_M = 64
# The measured "xw" winners have N/block_n × k_splits between 256 and 512 programs (2-4 per H100 SM).
_MIN_PROGRAMS = 256


def default_config(m: int, k: int, n: int, group: int) -> Config:
    """A tuned config for this shape if one was measured, else the winners' pattern: 16- or 64-row tiles, 128
    columns, one group per step, K split until there are ≥ 256 programs."""
    bucket = next((b for b in _M_BUCKETS if m <= b), None)
    if bucket is not None and group == 128 and (k, n, bucket) in _TUNED:  # tuned with group 128
        return _TUNED[(k, n, bucket)]
    bm = 16 if m <= 16 else 64
    bn = 128 if n % 128 == 0 else 64
    groups = k // group
    splits = 1
    while n // bn * pl.cdiv(m, bm) * splits < _MIN_PROGRAMS and groups % (2 * splits) == 0:
        splits *= 2
    return Config(bm, bn, 1, splits)


def _offsets_wrap(shape, dtype) -> bool:
    """Whether Pallas would index an array of this shape with 32-bit offsets that pass 2**31 (module docstring)."""
    return 2**31 < math.prod(shape) * jnp.dtype(dtype).itemsize <= 2**32


def supported(x: jax.Array, qvalue: jax.Array, scales: jax.Array, *, layer=None) -> bool:
    """Whether `matmul` can run this on the current backend (GPU; int8 values; power-of-2 group; N % 64 == 0;
    no single weight of 2–4 GiB)."""
    if jax.default_backend() != "gpu":
        return False
    lead = 0 if layer is None else 1
    if qvalue.ndim < lead + 2 or scales.ndim != qvalue.ndim or qvalue.shape[lead] != x.shape[-1]:
        return False
    k, groups = qvalue.shape[lead], scales.shape[lead]
    group = k // groups if groups and k % groups == 0 else 0
    return (
        x.dtype in (jnp.bfloat16, jnp.float16)
        and qvalue.dtype == jnp.int8
        and group >= 16 and group & (group - 1) == 0
        and math.prod(qvalue.shape[lead + 1:]) % 64 == 0
        and not _offsets_wrap(qvalue.shape[lead:], qvalue.dtype)
    )


def _dequantize_dot(x, q, s, layer, out_dtype):
    """The prefill path: x [M, K] @ dequantized layer `layer` of q [L, K, N] in x.dtype, XLA's dot (cuBLAS)."""
    q, s = q[layer[0]], s[layer[0]]  # XLA fuses the slice into the dequantize fusion
    k, n = q.shape
    w = q.reshape(s.shape[0], -1, n).astype(jnp.float32) * s.astype(jnp.float32)[:, None]
    return jnp.dot(x, w.reshape(k, n).astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def matmul(x: jax.Array, qvalue: jax.Array, scales: jax.Array, *, layer=None, out_dtype=None,
           config: Config | None = None, interpret: bool = False) -> jax.Array:
    """x [..., K] @ int8 weight -> [..., *N] in out_dtype (default x.dtype), accumulated in float32.

    Without `layer`: qvalue [K, *N], scales [K // g, *N]. With `layer` (an int scalar, may be traced):
    qvalue [L, K, *N] and scales [L, K // g, *N] are stacked layers, and layer `layer` is used in place.
    `config` forces the kernel with that tiling; by default the shape picks a config, and M > MAX_KERNEL_M goes to
    dequantize + XLA dot (measured faster there). `interpret=True` runs the kernel in Pallas's interpreter (CPU tests).
    """
    out_dtype = out_dtype or x.dtype
    stacked = layer is not None
    q3 = qvalue if stacked else qvalue[None]
    s3 = scales if stacked else scales[None]
    n_shape = q3.shape[2:]
    k, n = q3.shape[1], math.prod(n_shape)
    q3 = q3.reshape(q3.shape[0], k, n)  # contiguous: free
    s3 = s3.reshape(s3.shape[0], s3.shape[1], n)
    layer = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    if stacked and _offsets_wrap(q3.shape, q3.dtype):  # read the layer through an XLA slice (a copy) rather than wrap
        q3, s3 = q3[layer[0]][None], s3[layer[0]][None]
        layer = jnp.zeros((1,), jnp.int32)
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x.reshape(m, k)
    if config is None and m > MAX_KERNEL_M:
        return _dequantize_dot(x2, q3, s3, layer, out_dtype).reshape(*lead, *n_shape)
    cfg = config or default_config(m, k, n, k // s3.shape[1])
    m_padded = pl.cdiv(m, cfg.block_m) * cfg.block_m
    if m_padded != m:
        x2 = jnp.pad(x2, ((0, m_padded - m), (0, 0)))
    y = _pallas_matmul(x2, q3, s3, layer, cfg, out_dtype, interpret)
    return y[:m].reshape(*lead, *n_shape)
