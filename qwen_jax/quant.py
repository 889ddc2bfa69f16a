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

from qwen_jax import sharding as sharding_lib
from qwen_jax.kernels import int8_matmul


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


def matmul(x: jax.Array, weight: dict[str, jax.Array], out_dtype=None, layer: jax.Array | None = None) -> jax.Array:
    """x [..., K] @ weight [K, *N] -> [..., *N] in `out_dtype` (default x.dtype), accumulated in float32.

    `weight` holds either {"kernel"} (float) or {"qvalue", "scales"} (int8). With `layer`, the arrays are stacks
    [L, …] of all layers and layer `layer` is used. On a GPU the fused kernel takes every weight whose shape it
    supports (`kernel_operands` says why float weights too), everything else goes to `reference_matmul`.
    """
    operands = kernel_operands(weight)
    if _kernel_applies(x, operands, layer):
        return int8_matmul.matmul(x, *operands, layer=layer, out_dtype=out_dtype or x.dtype)
    return reference_matmul(x, weight, out_dtype, layer)


def reference_matmul(x: jax.Array, weight: dict[str, jax.Array], out_dtype=None,
                     layer: jax.Array | None = None) -> jax.Array:
    """The XLA path of `matmul`: dequantize one layer inside the jitted step (XLA frees it after the dot), then dot.

    The CPU path, and the reference the fused kernel is tested against.
    """
    if "qvalue" in weight:
        kernel = dequantize(at_layer(weight["qvalue"], layer), at_layer(weight["scales"], layer), x.dtype)
    else:
        kernel = at_layer(weight["kernel"], layer).astype(x.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision(x.dtype),
                            preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def precision(dtype) -> jax.lax.Precision:
    """Float32 activations ask for exactness: full float32 dots (GPUs otherwise use TF32 for float32 matmuls)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def at_layer(stack: jax.Array, layer: jax.Array | None) -> jax.Array:
    """Layer `layer` of a stacked parameter [L, …]; the parameter itself when `layer` is None."""
    return stack if layer is None else jax.lax.dynamic_index_in_dim(stack, layer, keepdims=False)


def kernel_operands(weight: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
    """The fused kernel's weight operands: (qvalue, scales) or (kernel,).

    Float weights go to the kernel as well: a stacked one because XLA would copy the layer's slice before its dot;
    an unstacked one (the lm_head) because XLA's GEMM autotuner profiles its dot on a test copy of the weight when
    the program compiles. For 72B that is 2.3 GiB, allocated after the KV cache: on an H100 a 5120-token context
    failed on exactly that allocation (BENCHMARKS.md).
    """
    if "qvalue" in weight:
        return weight["qvalue"], weight["scales"]
    return (weight["kernel"],)


def _kernel_applies(x, operands, layer) -> bool:
    # Under a mesh of several devices the XLA path runs (a shard_map'd kernel is future work).
    return sharding_lib.traced_devices() == 1 and int8_matmul.supported(x, *operands, layer=layer)
