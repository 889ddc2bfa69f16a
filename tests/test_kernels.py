"""The fused matmul kernel, run in Pallas's interpreter on the CPU, against float64 numpy and qwen_jax.quant's XLA
reference, with int8 (group-scaled) and bf16 weights.

Shapes are small (K = 512, group 128) so that the interpreter, which runs the grid one program at a time, stays
fast; every kernel form, K splits, several groups per step, multi-axis N, padded M and stacked layers read through
a traced layer index are covered for both weight kinds. The GPU timings and the 72B-shape checks are in
benchmarks/int8_matmul.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import quant
from qwen_jax.kernels import int8_matmul as km

K, GROUP, N_SHAPE = 512, 128, (2, 64)
KINDS = ("int8", "bfloat16")


def _weight(kind, seed, layers=None):
    """quant's weight dict, {"qvalue", "scales"} or {"kernel"}, of one layer [K, *N] or a stack [layers, K, *N]."""
    lead = () if layers is None else (layers,)
    kq, ks = jax.random.split(jax.random.key(seed))
    if kind == "bfloat16":
        return {"kernel": (jax.random.normal(kq, (*lead, K, *N_SHAPE)) * K ** -0.5).astype(jnp.bfloat16)}
    q = jax.random.randint(kq, (*lead, K, *N_SHAPE), -128, 128, jnp.int32).astype(jnp.int8)
    s = jax.random.uniform(ks, (*lead, K // GROUP, *N_SHAPE), minval=1e-3, maxval=1e-2).astype(jnp.float16)
    return {"qvalue": q, "scales": s}


def _layer(weight, i):
    return {name: a[i] for name, a in weight.items()}


def _x(seed, lead):
    return jax.random.normal(jax.random.key(seed), (*lead, K), jnp.float32).astype(jnp.bfloat16)


def _rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def _float64_ref(x, weight):
    """x @ W in float64, W one layer's weight exactly (q × s is exact in float32: 8-bit × 11-bit mantissas)."""
    w = weight["kernel"] if "kernel" in weight else quant.dequantize(weight["qvalue"], weight["scales"], jnp.float32)
    w = np.asarray(w, np.float64)
    return (np.asarray(x, np.float64).reshape(-1, K) @ w.reshape(K, -1)).reshape(*x.shape[:-1], *w.shape[1:])


CONFIGS = [
    km.Config(16, 64, 1, 1, form="xw"),
    km.Config(16, 128, 2, 2, form="xw"),
    km.Config(16, 128, 1, 4, num_warps=8, num_stages=4),
    km.Config(1, 64, 2, 2, form="fma"),
    km.Config(4, 128, 1, 1, form="fma"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.form}-bm{c.block_m}-bn{c.block_n}-g{c.groups_per_step}-s{c.k_splits}")
def test_kernel_matches_xla_reference(cfg, kind):
    weight = _weight(kind, 0)
    lead = (3,) if cfg.block_m <= 4 else (2, 9)  # M = 3 pads to 4 (fma); M = 18 pads to two 16-row tiles
    x = _x(1, lead)
    y = km.matmul(x, *quant.kernel_operands(weight), config=cfg, interpret=True)
    ref = quant.reference_matmul(x, weight)
    assert y.shape == ref.shape == (*lead, *N_SHAPE) and y.dtype == jnp.bfloat16
    # x and the weights are exact in float32 products, so both paths differ from float64 by their bf16 output
    # rounding (≤ 2^-9 ≈ 2e-3 relative); for int8 the reference also rounds each dequantized weight to bf16.
    assert _rel_err(y, _float64_ref(x, weight)) < 4e-3
    assert _rel_err(y, ref) < 8e-3


@pytest.mark.parametrize("kind", KINDS)
def test_stacked_layers_in_place_under_fori_loop(kind):
    """Σ over the layers of a stack, each read in place through the loop's traced index, with float32 outputs."""
    layers = 3
    weight = _weight(kind, 2, layers)
    x = _x(3, (5,))

    def layer_sum(x, weight):
        def body(i, acc):
            return acc + km.matmul(x, *quant.kernel_operands(weight), layer=i, out_dtype=jnp.float32,
                                   config=km.Config(16, 64, 2, 2), interpret=True)
        return jax.lax.fori_loop(0, layers, body, jnp.zeros((5, *N_SHAPE), jnp.float32))

    y = jax.jit(layer_sum)(x, weight)
    exact = sum(_float64_ref(x, _layer(weight, i)) for i in range(layers))
    assert _rel_err(y, exact) < 1e-5  # float32 out: only float32 accumulation error


def test_float16_weight_is_converted_to_the_activation_dtype():
    w = _weight("bfloat16", 4)["kernel"].astype(jnp.float16)
    x = _x(5, (3,))
    for cfg in (km.Config(16, 128, 1, 2), km.Config(4, 64, 1, 2, form="fma")):
        y = km.matmul(x, w, out_dtype=jnp.float32, config=cfg, interpret=True)
        # "xw" rounds the float16 weights to bf16 for the dot, as the XLA reference does (2^-9 relative each);
        # "fma" multiplies in float32 and is exact up to accumulation.
        assert _rel_err(y, quant.reference_matmul(x, {"kernel": w}, jnp.float32)) < (1e-5 if cfg.form == "xw" else 4e-3)
        assert _rel_err(y, _float64_ref(x, {"kernel": w})) < (4e-3 if cfg.form == "xw" else 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_default_config_and_large_m_fallback(kind):
    weight = _weight(kind, 4)
    for lead in [(1,), (40,)]:
        x = _x(5, lead)
        assert _rel_err(km.matmul(x, *quant.kernel_operands(weight), interpret=True), _float64_ref(x, weight)) < 4e-3
    x = _x(6, (2, 100))  # M = 200 > MAX_KERNEL_M: (dequantize +) XLA dot
    assert _rel_err(km.matmul(x, *quant.kernel_operands(weight)), quant.reference_matmul(x, weight)) < 1e-6


@pytest.mark.parametrize("weight_itemsize", [1, 2])
def test_default_config_tiles_divide(weight_itemsize):
    for m, k, n in [(1, 8192, 24576), (16, 8192, 8192), (64, 24576, 8192), (4, 8192, 49152), (7, 1024, 192)]:
        cfg = km.default_config(m, k, n, 128, weight_itemsize)
        cfg.check(-(-m // cfg.block_m) * cfg.block_m, k, n, 128)


@pytest.mark.parametrize("kind", KINDS)
def test_only_an_int8_stack_of_2_to_4_gib_is_read_through_a_slice(kind):
    """Pallas would index a 3 GiB int8 stack with wrapping 32-bit element offsets (3 × 2**30 elements); a 3 GiB bf16
    stack has half as many elements and is read in place. Only the shapes matter, so trace without data."""
    n = 128 * 1024 if kind == "int8" else 64 * 1024  # 3 layers: 3 GiB either way
    weight = {name: jax.ShapeDtypeStruct((3, rows, n), dtype) for name, rows, dtype in (
        [("qvalue", 8192, jnp.int8), ("scales", 64, jnp.float16)] if kind == "int8"
        else [("kernel", 8192, jnp.bfloat16)])}
    x = jax.ShapeDtypeStruct((1, 8192), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x, w: km.matmul(x, *quant.kernel_operands(w), layer=jnp.int32(2)))(x, weight)
    [call] = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert call.invars[2].aval.shape == ((1 if kind == "int8" else 3), 8192, n)  # one layer, or the stack


def test_supported_predicate():
    q, s = quant.kernel_operands(_weight("int8", 7))
    w = _weight("bfloat16", 7)["kernel"]
    x = _x(8, (1,))
    on_gpu = jax.default_backend() == "gpu"
    assert km.supported(x, q, s) == km.supported(x, w) == on_gpu
    if on_gpu:
        assert not km.supported(x.astype(jnp.float32), q, s)
        assert not km.supported(x, q[:, :, :48], s[:, :, :48])  # N = 96 is no multiple of 64
        assert not km.supported(x, w.astype(jnp.float32))  # 4-byte weights: not what the kernel was built for
        assert not km.supported(x[:, :320], w[:320])  # K = 320 is no multiple of FLOAT_GROUP


def test_quant_matmul_sends_every_supported_weight_to_the_kernel(monkeypatch):
    """Which path quant.matmul traces on a GPU (faked: tracing only): stacked int8 and float weights and an unstacked
    float weight (the lm_head, kept from XLA's autotuner) take the kernel; a float32 input takes XLA's dot."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x = jax.ShapeDtypeStruct((1, K), jnp.bfloat16)

    def primitives(weight, layer):
        jaxpr = jax.make_jaxpr(lambda x, w: quant.matmul(x, w, layer=layer))(x, weight)
        return {e.primitive.name for e in jaxpr.eqns}

    assert "pallas_call" in primitives(_weight("int8", 9, layers=2), jnp.int32(1))
    assert "pallas_call" in primitives(_weight("bfloat16", 9, layers=2), jnp.int32(1))
    assert "pallas_call" in primitives(_weight("bfloat16", 9), None)
    x = jax.ShapeDtypeStruct((1, K), jnp.float32)
    assert "pallas_call" not in primitives(_weight("bfloat16", 9), None)
