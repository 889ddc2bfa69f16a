"""The fused int8 matmul kernel, run in Pallas's interpreter on the CPU, against qwen_jax.quant's XLA reference.

Shapes are small (K = 512, group 128) so that the interpreter, which runs the grid one program at a time, stays
fast; every kernel form, K splits, several groups per step, multi-axis N, padded M and stacked layers are covered.
The GPU timings and the 72B-shape checks are in benchmarks/int8_matmul.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import quant
from qwen_jax.kernels import int8_matmul as km

K, GROUP, N_SHAPE = 512, 128, (2, 64)


def _weights(seed, layers=None):
    lead = () if layers is None else (layers,)
    kq, ks = jax.random.split(jax.random.key(seed))
    q = jax.random.randint(kq, (*lead, K, *N_SHAPE), -128, 128, jnp.int32).astype(jnp.int8)
    s = jax.random.uniform(ks, (*lead, K // GROUP, *N_SHAPE), minval=1e-3, maxval=1e-2).astype(jnp.float16)
    return q, s


def _x(seed, lead):
    return jax.random.normal(jax.random.key(seed), (*lead, K), jnp.float32).astype(jnp.bfloat16)


def _rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def _float64_ref(x, q, s):
    w = np.asarray(quant.dequantize(q, s, jnp.float32), np.float64).reshape(K, -1)
    return (np.asarray(x, np.float64).reshape(-1, K) @ w).reshape(*x.shape[:-1], *q.shape[1:])


CONFIGS = [
    km.Config(16, 64, 1, 1, form="xw"),
    km.Config(16, 128, 2, 2, form="xw"),
    km.Config(16, 128, 1, 4, num_warps=8, num_stages=4),
    km.Config(1, 64, 2, 2, form="fma"),
    km.Config(4, 128, 1, 1, form="fma"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.form}-bm{c.block_m}-bn{c.block_n}-g{c.groups_per_step}-s{c.k_splits}")
def test_kernel_matches_xla_reference(cfg):
    q, s = _weights(0)
    lead = (3,) if cfg.block_m <= 4 else (2, 9)  # M = 3 pads to 4 (fma); M = 18 pads to two 16-row tiles
    x = _x(1, lead)
    y = km.matmul(x, q, s, config=cfg, interpret=True)
    ref = quant.reference_matmul(x, {"qvalue": q, "scales": s})
    assert y.shape == ref.shape == (*lead, *N_SHAPE) and y.dtype == jnp.bfloat16
    exact = _float64_ref(x, q, s)
    # Both round the output to bf16 (≈ 2e-3); the reference also rounds each dequantized weight to bf16.
    assert _rel_err(y, exact) < 4e-3
    assert _rel_err(y, ref) < 8e-3


def test_stacked_layer_in_place_and_float32_out():
    q, s = _weights(2, layers=3)
    x = _x(3, (5,))
    layer = jnp.int32(1)
    y = jax.jit(lambda x, q, s, i: km.matmul(x, q, s, layer=i, out_dtype=jnp.float32,
                                             config=km.Config(16, 64, 2, 2), interpret=True))(x, q, s, layer)
    assert y.dtype == jnp.float32
    assert _rel_err(y, _float64_ref(x, q[1], s[1])) < 1e-5  # float32 out: only float32 accumulation error


def test_default_config_and_large_m_fallback():
    q, s = _weights(4)
    for lead in [(1,), (40,)]:
        x = _x(5, lead)
        assert _rel_err(km.matmul(x, q, s, interpret=True), _float64_ref(x, q, s)) < 4e-3
    x = _x(6, (2, 100))  # M = 200 > MAX_KERNEL_M: dequantize + XLA dot
    assert _rel_err(km.matmul(x, q, s), quant.reference_matmul(x, {"qvalue": q, "scales": s})) < 1e-6


def test_default_config_tiles_divide():
    for m, k, n in [(1, 8192, 24576), (16, 8192, 8192), (64, 24576, 8192), (4, 8192, 49152), (7, 1024, 192)]:
        cfg = km.default_config(m, k, n, 128)
        cfg.check(-(-m // cfg.block_m) * cfg.block_m, k, n, 128)


def test_stack_of_2_to_4_gib_is_read_through_a_slice():
    """Pallas would index it with wrapping 32-bit offsets; only the shapes matter, so trace without data."""
    q = jax.ShapeDtypeStruct((3, 8192, 128 * 1024), jnp.int8)  # 3 GiB
    s = jax.ShapeDtypeStruct((3, 64, 128 * 1024), jnp.float16)
    x = jax.ShapeDtypeStruct((1, 8192), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x, q, s: km.matmul(x, q, s, layer=jnp.int32(2)))(x, q, s)
    [call] = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert call.invars[2].aval.shape == (1, 8192, 128 * 1024)  # one layer, not the stack


def test_supported_predicate():
    q, s = _weights(7)
    x = _x(8, (1,))
    assert km.supported(x, q, s) == (jax.default_backend() == "gpu")
    if jax.default_backend() == "gpu":
        assert not km.supported(x.astype(jnp.float32), q, s)
        assert not km.supported(x, q[:, :, :48], s[:, :, :48])  # N = 96 is no multiple of 64
