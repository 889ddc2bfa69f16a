"""Fused weight-streaming matmul for decode on the GPU (Pallas, Triton lowering): int8 or float weights.

    y [M, *N] = x [M, K] @ W,   W[k, n] = qvalue[k, n] * scales[k // g, n]   (int8)
                                W[k, n] = weight[k, n]                       (float)

with qvalue int8 [K, *N] and scales float16 [K // g, *N] in qwen_jax.quant's layout (K-major, group-contiguous).
Decode (small M) is bound by reading the weights, so the kernel reads each weight byte and each scale once,
converts in registers and accumulates in float32; it never writes a dequantized copy.

Float weights (bf16/f16) come here for the in-place `layer` below: XLA copies a dynamically indexed layer out
of its stack before cuBLAS reads it (a dynamic slice is not fused into a GEMM operand), so every bf16 weight byte
moved about three times (BENCHMARKS.md, "72b × 8 layers, bf16"); and unstacked (the lm_head) to keep XLA's GEMM
autotuner from allocating a test copy of the weight (qwen_jax.quant.kernel_operands).

One program owns a [block_m, block_n] output tile and one of `k_splits` contiguous K ranges. It walks its range
`groups_per_step` groups of g rows per loop step: for int8 g is the quantization group; float weights have no
groups and are walked in FLOAT_GROUP rows. Per group it forms x[:, g] @ w[g, :] with w converted to x's dtype
(exact for int8: |q| ≤ 128) and, for int8, multiplies that [block_m, block_n] partial product by the group's
scales row. That is exact algebra and costs M×N multiplies per group instead of dequantizing g×N weights.
The per-group product takes one of two forms (`Config.form`):
  "xw":  dot(x, q)         tensor cores (x read as block_m ≥ 16 rows, missing rows as zeros)
  "fma": Σ_k x[:, k] q[k]  no tensor cores, for block_m ≤ 4 rows
(A third form, dot(qᵀ, xᵀ)ᵀ with the weight as the A operand, was slower than "xw" at all four 72B shapes on the
H100 at M = 16, by 5–40%, and was dropped.)
With k_splits > 1 the K ranges write float32 partial sums [k_splits, M, N] that one small XLA reduction adds
(and casts): splitting K keeps enough programs in flight when N / block_n alone would leave SMs idle.

`layer` lets a stacked weight [L, K, *N] be used in place (e.g. under lax.fori_loop): the kernel offsets its
pointers by the layer index instead of XLA copying a dynamic slice of the stack for the custom call.

Pallas's Triton lowering indexes an array of at most 4 GiB with signed 32-bit element offsets, which wrap past
2**31 elements: only a 1-byte array of 2-4 GiB gets there (seen on the H100 with jax 0.11.2: wrong results for a
3.2 GB int8 stack; a 3.4 GB bf16 stack reads correctly, benchmarks/attention_gpu.py). Such an int8 array is never
indexed by the kernel: a stack is read through an XLA slice of its layer, and a single weight is not `supported`.
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
# How int8 weights become floats in registers (`Config.convert`):
#   "cvt":    the compiler's int8 -> float conversion (I2F, a quarter-rate instruction on Hopper)
#   "asm":    PRMT byte moves into a float's mantissa and one subtract, 4 values at a time (_ASM below)
#   "asm16":  "asm" to float16 (two PRMTs and two half2 subtracts per 4 values), with the dot in float16
CONVERTS = ("cvt", "asm", "asm16")
# "asm16" rounds x to float16 after scaling by this power of two (exact), so that activations up to 65504 / 2^-6
# ≈ 4.2e6 stay finite; values under 2^-14 × 2^6 ≈ 3.9e-3 become float16 subnormals, off by at most 2^-25 × 2^6 ≈
# 1.9e-6, below bf16's own rounding of a value of that size. Group products are divided by it again with the scales.
F16_PRESCALE = 2.0**-6


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int  # output rows per program: power of 2, ≥ 16 for "xw" (tl.dot's minimum), ≤ 4 for "fma"
    block_n: int  # output columns per program: power of 2 dividing N
    groups_per_step: int  # groups (of g rows) per loop step: more bytes in flight per step, more shared memory
    k_splits: int  # programs along K; each sums K / k_splits rows
    num_warps: int = 4
    num_stages: int = 3  # Triton's software-pipelining depth of the K loop
    form: str = "xw"
    convert: str = "cvt"

    def check(self, m_padded: int, k: int, n: int, group: int) -> None:
        if self.form not in FORMS or self.convert not in CONVERTS:
            raise ValueError(f"form {self.form!r} not in {FORMS} or convert {self.convert!r} not in {CONVERTS}")
        if (self.form == "fma") != (self.block_m <= 4) or m_padded % self.block_m:
            raise ValueError(f"{self}: block_m must be ≤ 4 exactly for 'fma' and divide the padded M={m_padded}")
        if self.form == "fma" and group % _FMA_ROWS:
            raise ValueError(f"{self}: the 'fma' form needs a group size that is a multiple of {_FMA_ROWS}")
        if n % self.block_n or k % group or (k // group) % (self.k_splits * self.groups_per_step):
            raise ValueError(f"{self}: block_n must divide N={n}, the group g={group} K={k}, k_splits × "
                             f"groups_per_step the {k // group} groups")


_FMA_ROWS = 32  # rows per broadcast product in the "fma" form: [bm, 32, bn] float32 stays within registers
# Rows per group of a float weight, which has no quantization groups: the group size of the tuned int8 weights
# (so that the same configs divide K), a multiple of _FMA_ROWS.
FLOAT_GROUP = 128


def _load_weight(w_ref, layer, rows):
    # Each weight byte is read once: evict it first so that x and the scales stay in L2.
    return plgpu.load(w_ref.at[layer, rows, :], eviction_policy="evict_first")


# PTX for 4 int8 values (one 32-bit register) -> 4 floats, exact for |q| ≤ 128. XOR 0x80 turns q into u = q + 128;
# PRMT copies byte u into the low mantissa byte of a float whose other bytes are the magic number's, giving
# magic + u exactly; one subtract of (magic + 128) leaves q. float32: magic 2^23 (0x4B000000); float16: 1024 (0x6400),
# two values per register, one half2 subtract; bfloat16 (7 mantissa bits, too few for u) goes through float32 and
# keeps each result's upper half. Output registers hold consecutive values, the first in the low bits.
_F32_BYTES = """xor.b32 u, {src}, 0x80808080;
mov.b32 m, 0x4B000000;
prmt.b32 {d0}, u, m, 0x7440;
prmt.b32 {d1}, u, m, 0x7441;
prmt.b32 {d2}, u, m, 0x7442;
prmt.b32 {d3}, u, m, 0x7443;
sub.f32 {d0}, {d0}, 0f4B000080;
sub.f32 {d1}, {d1}, 0f4B000080;
sub.f32 {d2}, {d2}, 0f4B000080;
sub.f32 {d3}, {d3}, 0f4B000080;"""
_ASM = {  # dtype name -> (asm, output constraints per 4 values: "f" a float32 register, "r" two 16-bit values)
    "float32": ("{.reg .b32 u, m;\n" + _F32_BYTES.format(src="$4", d0="$0", d1="$1", d2="$2", d3="$3") + "}", "ffff"),
    "bfloat16": ("{.reg .b32 u, m, f0, f1, f2, f3;\n" + _F32_BYTES.format(src="$2", d0="f0", d1="f1", d2="f2", d3="f3")
                 + "\nprmt.b32 $0, f0, f1, 0x7632;\nprmt.b32 $1, f2, f3, 0x7632;}", "rr"),
    "float16": ("""{.reg .b32 u, m, c;
xor.b32 u, $2, 0x80808080;
mov.b32 m, 0x64646464;
mov.b32 c, 0x64806480;
prmt.b32 $0, u, m, 0x4140;
prmt.b32 $1, u, m, 0x4342;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;}""", "rr"),
}


def _to_float(w, dtype, convert: str, interpret: bool):
    """int8 w -> dtype, exactly. The interpreter (CPU) has no PTX: there every `convert` is a plain astype, and
    tests/test_kernels.py checks the PTX's arithmetic with a NumPy model of PRMT and the subtracts."""
    if w.dtype != jnp.int8 or convert == "cvt" or interpret:
        return w.astype(dtype)
    asm, outputs = _ASM[jnp.dtype(dtype).name]
    [y] = plgpu.elementwise_inline_asm(asm, args=[w], constraints=",".join([f"={c}" for c in outputs] + ["r"]), pack=4,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, dtype)])
    return y


def _load_x(x_ref, cols, block_m: int):
    """x[:, cols] as [block_m, ·]: an x of fewer rows (M < block_m, the whole of a decode step's M) is read with
    its missing rows masked to zero, in place of an XLA pad of x before the call (one kernel per linear)."""
    if x_ref.shape[0] == block_m:
        return x_ref[:, cols]
    rows_ok = jnp.arange(block_m) < x_ref.shape[0]
    return plgpu.load(x_ref.at[pl.ds(0, block_m), cols], mask=rows_ok[:, None], other=0)


def _fma_group(x_ref, w_ref, layer, start, group, block_m, to_float):
    """Σ_k x[:, k] w[k, :] over rows [start, start + group) without tensor cores -> [bm, bn] float32."""
    part = None
    for c in range(0, group, _FMA_ROWS):
        rows = pl.ds(pl.multiple_of(start + c, _FMA_ROWS), _FMA_ROWS)
        x = _load_x(x_ref, rows, block_m).astype(jnp.float32)  # [bm, 32]
        w = to_float(_load_weight(w_ref, layer, rows), jnp.float32)  # [32, bn]
        term = jnp.sum(x[:, :, None] * w[None, :, :], axis=1)
        part = term if part is None else part + term
    return part


def _kernel(layer_ref, x_ref, w_ref, *refs, cfg: Config, group: int, steps: int, interpret: bool):
    """layer_ref [1] int32; x_ref [bm, Ks] (or [M, Ks], M < bm); w_ref [L, Ks, bn]; refs: (s_ref [L, Ks // g, bn],
    o_ref [bm, bn]) for int8 weights, (o_ref,) for float weights."""
    s_ref, o_ref = refs if len(refs) == 2 else (None, *refs)
    layer = layer_ref[0]
    f32 = jnp.float32
    to_float = functools.partial(_to_float, convert=cfg.convert, interpret=interpret)
    f16_dot = cfg.convert == "asm16" and s_ref is not None and cfg.form == "xw"

    def step(i, acc):
        for j in range(cfg.groups_per_step):  # unrolled: all groups' loads are issued before their math
            grp = i * cfg.groups_per_step + j
            s = None if s_ref is None else s_ref[layer, grp, :].astype(f32)  # [bn]
            if cfg.form == "fma":
                part = _fma_group(x_ref, w_ref, layer, grp * group, group, cfg.block_m, to_float)
            else:
                rows = pl.ds(pl.multiple_of(grp * group, group), group)
                x = _load_x(x_ref, rows, cfg.block_m)  # [bm, g]
                if f16_dot:
                    x = (x.astype(f32) * F16_PRESCALE).astype(jnp.float16)
                w = to_float(_load_weight(w_ref, layer, rows), x.dtype)  # [g, bn]
                part = jnp.dot(x, w, preferred_element_type=f32)
                if f16_dot:
                    s = s / F16_PRESCALE
            acc += part if s is None else part * s[None, :]
        return acc

    acc = lax.fori_loop(0, steps, step, jnp.zeros((cfg.block_m, cfg.block_n), f32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _pallas_matmul(x, w, s, layer, group: int, cfg: Config, out_dtype, interpret: bool):
    """x [M, K], w [L, K, N] (int8 with s [L, K // g, N], or float with s None), layer [1] int32
    -> [Mp, N] out_dtype, Mp = M rounded up to whole block_m tiles (M % block_m == 0 or M < block_m)."""
    m, k = x.shape
    mp = pl.cdiv(m, cfg.block_m) * cfg.block_m
    n_layers, _, n = w.shape
    cfg.check(mp, k, n, group)
    bm, bn, splits = cfg.block_m, cfg.block_n, cfg.k_splits
    k_split = k // splits
    partial = splits > 1
    operands = [layer, x, w]
    in_specs = [
        pl.BlockSpec((1,), lambda j, i, h: (0,)),
        pl.BlockSpec((min(bm, m), k_split), lambda j, i, h: (i, h)),
        pl.BlockSpec((n_layers, k_split, bn), lambda j, i, h: (0, h, j)),
    ]
    if s is not None:
        operands.append(s)
        in_specs.append(pl.BlockSpec((n_layers, k_split // group, bn), lambda j, i, h: (0, h, j)))
    y = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, group=group, steps=k_split // (group * cfg.groups_per_step),
                          interpret=interpret),
        grid=(n // bn, mp // bm, splits),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, bn), lambda j, i, h: (h, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, n), jnp.float32 if partial else out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"{'int8' if s is not None else jnp.dtype(w.dtype).name}_matmul_{cfg.form}_{cfg.convert}",
    )(*operands)
    return y.sum(0).astype(out_dtype) if partial else y[0]


# Best measured configs per device kind (`jax.Device.device_kind`), keyed by (K, N, M bucket): Qwen-72B's four layer
# shapes, jax 0.11.2. H100: the fastest of two sweeps' final timings (benchmarks/int8_matmul.py --sweep). H200
# (2026-12-02): at M = 1 and 16 the fastest of benchmarks/decode_probe.py's variants (c_attn and attn.c_proj at M = 1
# take their M = 16 winner, faster there); at M = 4 and 64 the faster of the H100 entry and the same tiling with the
# PTX conversion, timed side by side by benchmarks/int8_matmul.py. BENCHMARKS.md has the timings.
_TUNED: dict[str, dict[tuple[int, int, int], Config]] = {
    "NVIDIA H100 80GB HBM3": {
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
    },
    "NVIDIA H200": {
        (8192, 24576, 1): Config(16, 128, 1, 2, 4, 4, "xw", "asm16"),
        (8192, 24576, 4): Config(16, 128, 1, 2, 4, 3),
        (8192, 24576, 16): Config(16, 128, 1, 2, 4, 4, "xw", "asm16"),
        (8192, 24576, 64): Config(64, 128, 1, 2, 4, 3),
        (8192, 49152, 1): Config(1, 256, 2, 8, 4, 3, "fma", "asm"),
        (8192, 49152, 4): Config(16, 128, 1, 1, 4, 4),
        (8192, 49152, 16): Config(16, 128, 1, 2, 4, 4, "xw", "asm16"),
        (8192, 49152, 64): Config(64, 128, 1, 2, 4, 3, "xw", "asm16"),
        (8192, 8192, 1): Config(16, 128, 1, 4, 4, 4, "xw", "asm16"),
        (8192, 8192, 4): Config(16, 128, 1, 4, 4, 4, "xw", "asm16"),
        (8192, 8192, 16): Config(16, 128, 1, 4, 4, 4, "xw", "asm16"),
        (8192, 8192, 64): Config(64, 128, 1, 4, 8, 3),
        (24576, 8192, 1): Config(16, 128, 1, 4, 8, 3),
        (24576, 8192, 4): Config(16, 256, 1, 8, 4, 4, "xw", "asm16"),
        (24576, 8192, 16): Config(16, 256, 1, 8, 4, 4, "xw", "asm16"),
        (24576, 8192, 64): Config(64, 128, 1, 4, 4, 3, "xw", "asm16"),
    },
}
_M_BUCKETS = (1, 4, 16, 64)
# Above this many rows dequantize-to-bf16 + XLA's dot (cuBLAS) is used: at M = 2048 it measured about twice as fast
# as the kernel at every 72B shape, while at M = 64 the kernel measured 1.2-3.4x faster (BENCHMARKS.md). Measured
# with int8 weights; float weights use the same bound, untuned (there XLA's dot reads the sliced layer).
MAX_KERNEL_M = 64
# The measured "xw" winners have N/block_n × k_splits between 256 and 512 programs (2-4 per H100 SM).
_MIN_PROGRAMS = 256


def device_kind() -> str | None:
    """The first device's kind ('NVIDIA H200', …) on a GPU backend, else None (no tuned table applies)."""
    return jax.devices()[0].device_kind if jax.default_backend() == "gpu" else None


def default_config(m: int, k: int, n: int, group: int, weight_itemsize: int = 1, kind: str | None = None) -> Config:
    """The config tuned on this device kind (default: the current device's; None off a GPU) for this shape if one
    was measured, else a safe heuristic: the compiler's conversion, 16- or 64-row tiles, 128 columns, one group per
    step, K split until there are ≥ 256 programs (off a GPU: whole-K programs of up to 512 columns).

    Float weights (weight_itemsize 2) were not tuned on the device yet: they take the int8 config of their shape
    with one group per step, so that a step moves at most twice an int8 winner's bytes (the winners take 1 or 2),
    and the compiler's conversion (the PTX conversions are for int8).
    """
    bucket = next((b for b in _M_BUCKETS if m <= b), None)
    kind = kind if kind is not None else device_kind()
    tuned = _TUNED.get(kind, {})
    if bucket is not None and group == 128 and (k, n, bucket) in tuned:  # tuned with group 128
        cfg = tuned[(k, n, bucket)]
    elif kind is None:  # no GPU: Pallas's interpreter runs the programs one after another, so the fewest win
        bn = next(b for b in (512, 256, 128, 64) if n % b == 0)
        cfg = Config(16 if m <= 16 else 64, bn, 1, 1)
    else:
        bm = 16 if m <= 16 else 64
        bn = 128 if n % 128 == 0 else 64
        groups = k // group
        splits = 1
        while n // bn * pl.cdiv(m, bm) * splits < _MIN_PROGRAMS and groups % (2 * splits) == 0:
            splits *= 2
        cfg = Config(bm, bn, 1, splits)
    return cfg if weight_itemsize == 1 else dataclasses.replace(cfg, groups_per_step=1, convert="cvt")


def _offsets_wrap(shape, dtype) -> bool:
    """Whether Pallas would index an array of this shape with 32-bit offsets that pass 2**31 (module docstring)."""
    return math.prod(shape) > 2**31 and math.prod(shape) * jnp.dtype(dtype).itemsize <= 2**32


def _weight_fits(weight: jax.Array, scales: jax.Array | None, k: int, lead: int, any_float: bool) -> bool:
    """Int8 values with a power-of-2 group ≥ 16, or a float weight (2-byte unless `any_float`) whose K is a multiple
    of FLOAT_GROUP."""
    if scales is None:
        return (jnp.issubdtype(weight.dtype, jnp.floating) and (any_float or weight.dtype.itemsize == 2)
                and k % FLOAT_GROUP == 0)
    groups = scales.shape[lead] if scales.ndim == weight.ndim else 0
    group = k // groups if groups and k % groups == 0 else 0
    return weight.dtype == jnp.int8 and group >= 16 and group & (group - 1) == 0


def supported(x: jax.Array, weight: jax.Array, scales: jax.Array | None = None, *, layer=None,
              interpret: bool = False) -> bool:
    """Whether `matmul` can run this on the current backend (GPU; x bf16/f16; int8 values with a power-of-2 group,
    or a bf16/f16 weight (scales None) with K % FLOAT_GROUP == 0; N % 64 == 0; no single int8 weight of 2–4 GiB).
    `interpret=True`: whether Pallas's interpreter can (the CPU tests): the same tiling rules, any backend and float
    dtype."""
    if not interpret and (jax.default_backend() != "gpu" or x.dtype not in (jnp.bfloat16, jnp.float16)):
        return False
    lead = 0 if layer is None else 1
    if weight.ndim < lead + 2 or weight.shape[lead] != x.shape[-1]:
        return False
    return (
        _weight_fits(weight, scales, weight.shape[lead], lead, any_float=interpret)
        and math.prod(weight.shape[lead + 1:]) % 64 == 0
        and not _offsets_wrap(weight.shape[lead:], weight.dtype)
    )


def _xla_dot(x, w, s, layer, out_dtype):
    """The prefill path: x [M, K] @ layer `layer` of w [L, K, N] in x.dtype (dequantized with s [L, K // g, N]
    when int8, s None for float), XLA's dot (cuBLAS)."""
    w = w[layer[0]]
    if s is not None:
        s = s[layer[0]]  # XLA fuses the slice into the dequantize fusion
        k, n = w.shape
        w = (w.reshape(s.shape[0], -1, n).astype(jnp.float32) * s.astype(jnp.float32)[:, None]).reshape(k, n)
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def matmul(x: jax.Array, weight: jax.Array, scales: jax.Array | None = None, *, layer=None, out_dtype=None,
           config: Config | None = None, interpret: bool = False) -> jax.Array:
    """x [..., K] @ weight -> [..., *N] in out_dtype (default x.dtype), accumulated in float32.

    `weight` holds int8 values [K, *N] with `scales` [K // g, *N], or is a float weight [K, *N] (scales None).
    With `layer` (an int scalar, may be traced) both are stacked layers [L, …] and layer `layer` is used in place.
    `config` forces the kernel with that tiling; by default the shape picks a config, and M > MAX_KERNEL_M goes to
    (dequantize +) XLA dot (measured faster there for int8). `interpret=True` runs the kernel in Pallas's
    interpreter (CPU tests).
    """
    out_dtype = out_dtype or x.dtype
    stacked = layer is not None
    w3 = weight if stacked else weight[None]
    n_shape = w3.shape[2:]
    k, n = w3.shape[1], math.prod(n_shape)
    w3 = w3.reshape(w3.shape[0], k, n)  # contiguous: free
    s3 = None
    if scales is not None:
        s3 = scales if stacked else scales[None]
        s3 = s3.reshape(s3.shape[0], s3.shape[1], n)
    group = FLOAT_GROUP if s3 is None else k // s3.shape[1]
    layer = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    if stacked and _offsets_wrap(w3.shape, w3.dtype):  # read the layer through an XLA slice (a copy) rather than wrap
        w3 = w3[layer[0]][None]
        s3 = None if s3 is None else s3[layer[0]][None]
        layer = jnp.zeros((1,), jnp.int32)
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x.reshape(m, k)
    if config is None and m > MAX_KERNEL_M:
        return _xla_dot(x2, w3, s3, layer, out_dtype).reshape(*lead, *n_shape)
    cfg = config or default_config(m, k, n, group, jnp.dtype(w3.dtype).itemsize)
    m_padded = pl.cdiv(m, cfg.block_m) * cfg.block_m
    if m_padded != m and m > cfg.block_m:  # several row tiles; a single partial one is masked in the kernel
        x2 = jnp.pad(x2, ((0, m_padded - m), (0, 0)))
    y = _pallas_matmul(x2, w3, s3, layer, group, cfg, out_dtype, interpret)
    return y[:m].reshape(*lead, *n_shape)
