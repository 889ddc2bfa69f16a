"""A linear map of a frozen base weight, plus low-rank adapters: what fine-tuning needs from a `Linear`.

The base weight (float or int8 + scales, one layer of a stack or a single matrix) never receives a gradient:
`matmul` runs forward through `quant.matmul` (the fused kernel on a GPU, which has no transpose rule of its own) and
its backward computes only dx = dy · Wᵀ, dequantizing the one layer it needs inside the jitted step. Under per-layer
rematerialization (model.Qwen.remat) nothing of that dequantized layer outlives its dot.

LoRA factors of one linear (qwen_jax.finetune.lora builds them): {"a" [K, r], "b" [r, *out]} (each with a leading
[L] when the base is a stack), with the scale alpha / r already folded into "b", and optionally "dropout_key"
(raw key data) and "dropout_rate" for PEFT's dropout of the adapter's input. A linear whose output axis 0 holds
separately adapted parts (mlp/w1w2: w1 and w2) carries {part name: factors}.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwen_jax import quant


def matmul(x: jax.Array, weight: dict[str, jax.Array], out_dtype, layer: jax.Array | None,
           axes: tuple[str, ...] | None = None) -> jax.Array:
    """quant.matmul(x [..., K], weight [K, *N]) -> [..., *N], differentiable in x only (the weight is frozen);
    `axes`: the weight's logical axes, for the kernel under a mesh (quant.matmul)."""
    return _frozen_matmul(jnp.dtype(x.dtype), out_dtype, axes, x, weight, layer)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _frozen_matmul(x_dtype, out_dtype, axes, x, weight, layer):
    return quant.matmul(x, weight, out_dtype=out_dtype, layer=layer, axes=axes)


def _matmul_fwd(x_dtype, out_dtype, axes, x, weight, layer):
    # Residuals are the weight stack itself (loop-invariant, not copied) and the layer index: no dequantized copy.
    return quant.matmul(x, weight, out_dtype=out_dtype, layer=layer, axes=axes), (weight, layer)


def _matmul_bwd(x_dtype, out_dtype, axes, residuals, dy):
    weight, layer = residuals
    if "qvalue" in weight:
        w = quant.dequantize(quant.at_layer(weight["qvalue"], layer), quant.at_layer(weight["scales"], layer), x_dtype)
    else:
        w = quant.at_layer(weight["kernel"], layer).astype(x_dtype)
    n_out = w.ndim - 1
    out_axes = tuple(range(dy.ndim - n_out, dy.ndim))
    dx = jax.lax.dot_general(dy.astype(x_dtype), w, ((out_axes, tuple(range(1, w.ndim))), ((), ())),
                             precision=quant.precision(x_dtype), preferred_element_type=jnp.float32)
    return dx.astype(x_dtype), None, None  # None: a zero cotangent for the frozen weight and the index


_frozen_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def lora_delta(x: jax.Array, lora: dict, out_shape: tuple[int, ...], parts: tuple[str, ...],
               layer: jax.Array | None) -> jax.Array:
    """x [..., K] -> the adapters' contribution [..., *out_shape] in x.dtype.

    `parts` names the slices of out axis 0 that take separate adapters (then `lora` is {part: factors}); empty
    means one adapter for the whole output.
    """
    if not parts:
        return _one_delta(x, lora, layer)
    pieces = [_one_delta(x, lora[part], layer) if part in lora else jnp.zeros((*x.shape[:-1], *out_shape[1:]), x.dtype)
              for part in parts]
    return jnp.stack(pieces, axis=x.ndim - 1)


def _one_delta(x: jax.Array, factors: dict, layer: jax.Array | None) -> jax.Array:
    a = quant.at_layer(factors["a"], layer).astype(x.dtype)  # [K, r]
    b = quant.at_layer(factors["b"], layer).astype(x.dtype)  # [r, *out]
    if "dropout_key" in factors:
        key = jax.random.wrap_key_data(factors["dropout_key"])
        if layer is not None:
            key = jax.random.fold_in(key, layer)
        keep = 1.0 - factors["dropout_rate"]
        mask = jax.random.bernoulli(key, keep, x.shape)
        x = jnp.where(mask, x / keep.astype(x.dtype), 0).astype(x.dtype)
    xa = jnp.dot(x, a, precision=quant.precision(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    y = jnp.tensordot(xa, b, axes=1, precision=quant.precision(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
