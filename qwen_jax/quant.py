"""Weight-only int8 with group scales: the device layout and the XLA reference matmul.

Layout of a quantized linear with K inputs and outputs of shape N (one or more axes):
  qvalue  int8    [K, *N]       the GPTQ value minus its zero point (q - 128 for symmetric 8-bit)
  scales  float16 [K // g, *N]  one scale per group of g consecutive input rows and output column
K-major and group-contiguous: the g rows of group j are rows [j*g, (j+1)*g) of `qvalue`, so a kernel can stream
one group's int8 rows and its single scales row together. Scales stay float16, exactly as the checkpoint stores
them: rounding them to bfloat16 would move every weight by up to 2^-9 relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_size(qvalue: jax.Array, scales: jax.Array) -> int:
    k, groups = qvalue.shape[0], scales.shape[0]
    if groups == 0 or k % groups:
        raise ValueError(f"scales rows ({groups}) must divide the input dimension ({k})")
    return k // groups


def dequantize(qvalue: jax.Array, scales: jax.Array, dtype) -> jax.Array:
    """[K, *N] int8 and [K//g, *N] scales -> [K, *N] `dtype` (products formed in float32, rounded once)."""
    g = group_size(qvalue, scales)
    grouped = qvalue.reshape(scales.shape[0], g, *qvalue.shape[1:]).astype(jnp.float32)
    w = grouped * scales.astype(jnp.float32)[:, None]
    return w.reshape(qvalue.shape).astype(dtype)


def matmul(x: jax.Array, weight: dict[str, jax.Array], out_dtype=None) -> jax.Array:
    """x [..., K] @ weight [K, *N] -> [..., *N] in `out_dtype` (default x.dtype), accumulated in float32.

    `weight` holds either {"kernel"} (float) or {"qvalue", "scales"} (int8). This XLA path dequantizes one
    weight at a time inside the jitted step (XLA frees it after the dot); it is the CPU path and the
    reference for the fused GPU kernel.
    """
    if "qvalue" in weight:
        kernel = dequantize(weight["qvalue"], weight["scales"], x.dtype)
    else:
        kernel = weight["kernel"].astype(x.dtype)
    y = jax.lax.dot_general(
        x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return y.astype(out_dtype or x.dtype)
