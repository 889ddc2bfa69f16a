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


def matmul(x: jax.Array, weight: dict[str, jax.Array], out_dtype=None, layer: jax.Array | None = None,
           axes: tuple[str, ...] | None = None) -> jax.Array:
    """x [..., K] @ weight [K, *N] -> [..., *N] in `out_dtype` (default x.dtype), accumulated in float32.

    `weight` holds either {"kernel"} (float) or {"qvalue", "scales"} (int8). With `layer`, the arrays are stacks
    [L, …] of all layers and layer `layer` is used. On a GPU the fused kernel takes every weight whose shape it
    supports (`kernel_operands` says why float weights too), everything else goes to `reference_matmul`. Under a
    mesh (1×1 included) the kernel runs on each device's shards (`sharding.plan_matmul`, from the weight's logical
    `axes` (K, *N) and x's ("batch", "seq")), its partial sums reduced over the mesh axes that split K.
    """
    out_dtype = out_dtype or x.dtype
    operands = kernel_operands(weight)
    if not sharding_lib.under_mesh():
        if int8_matmul.supported(x, *operands, layer=layer):
            return int8_matmul.matmul(x, *operands, layer=layer, out_dtype=out_dtype)
    elif axes is not None and (y := _local_kernel(x, operands, layer, out_dtype, axes)) is not None:
        return y
    return reference_matmul(x, weight, out_dtype, layer)


def _local_kernel(x, operands, layer, out_dtype, axes) -> jax.Array | None:
    """The kernel on each device's shards under the traced mesh, or None where the plan or the shard shapes rule
    it out (then the XLA path runs)."""
    plan = sharding_lib.plan_matmul(("batch", "seq")[: x.ndim - 1], x.shape[:-1], axes, layer is not None)
    if plan is None:
        return None
    x_local = sharding_lib.local_shape(x.shape, plan.x)
    ops_local = [sharding_lib.local_shape(a.shape, plan.weight) for a in operands]
    if x_local is None or None in ops_local or not int8_matmul.supported(
            jax.ShapeDtypeStruct(x_local, x.dtype),
            *[jax.ShapeDtypeStruct(shape, a.dtype) for shape, a in zip(ops_local, operands)], layer=layer):
        return None
    reduced = bool(plan.sum_axes or plan.scatter_axes)

    def local(x, *ops):
        *ops, layer_index = ops if layer is not None else (*ops, None)
        # partial sums leave the kernel in float32 and are added in float32, as XLA's partitioned dot does
        y = int8_matmul.matmul(x, *ops, layer=layer_index, out_dtype=jnp.float32 if reduced else out_dtype)
        if plan.scatter_axes:
            y = jax.lax.psum_scatter(y, plan.scatter_axes, scatter_dimension=0, tiled=True)
        if plan.sum_axes:
            y = jax.lax.psum(y, plan.sum_axes)
        return y.astype(out_dtype)

    args = [x, *operands] + ([layer] if layer is not None else [])
    specs = [plan.x, *[plan.weight] * len(operands)] + ([jax.sharding.PartitionSpec()] if layer is not None else [])
    return sharding_lib.run_local(local, args, specs, plan.out)


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
