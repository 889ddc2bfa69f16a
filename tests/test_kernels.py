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
    km.Config(16, 128, 1, 2, form="xw", convert="asm16"),
    km.Config(1, 64, 2, 2, form="fma"),
    km.Config(4, 128, 1, 1, form="fma", convert="asm"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.form}-{c.convert}-bm{c.block_m}-bn{c.block_n}-g{c.groups_per_step}-s{c.k_splits}")
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


@pytest.mark.parametrize("device_kind", [*km._TUNED, "an unknown GPU", None])
@pytest.mark.parametrize("weight_itemsize", [1, 2])
def test_default_config_tiles_divide(weight_itemsize, device_kind):
    for m, k, n in [(1, 8192, 24576), (16, 8192, 8192), (64, 24576, 8192), (4, 8192, 49152), (7, 1024, 192)]:
        cfg = km.default_config(m, k, n, 128, weight_itemsize, kind=device_kind)
        cfg.check(-(-m // cfg.block_m) * cfg.block_m, k, n, 128)
        if weight_itemsize == 2:  # the PTX conversions take int8 values only
            assert cfg.convert == "cvt"


def test_default_config_is_looked_up_by_device_kind():
    """Each device kind gets its own table's entry; an unknown kind (or the CPU) the heuristic, which keeps the
    compiler's conversion; shapes outside the tables get the heuristic everywhere."""
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    for m, bucket in [(1, 1), (3, 4), (9, 16), (64, 64)]:
        for kind in (h100, h200):
            assert km.default_config(m, 8192, 49152, 128, kind=kind) == km._TUNED[kind][(8192, 49152, bucket)]
    assert km.default_config(1, 8192, 49152, 128, kind=h100) != km.default_config(1, 8192, 49152, 128, kind=h200)
    heuristic = km.default_config(1, 8192, 49152, 128, kind="NVIDIA A100-SXM4-80GB")
    assert heuristic == km.Config(16, 128, 1, 1) and heuristic.convert == "cvt"
    assert km.default_config(1, 8192, 8192, 128, kind="NVIDIA A100-SXM4-80GB") == km.Config(16, 128, 1, 4)
    assert km.default_config(1, 8192, 8192, 128, kind=None) == km.Config(16, 512, 1, 1)  # the CPU's interpreter
    assert km.default_config(1, 4096, 4096, 128, kind=h200) == km.default_config(1, 4096, 4096, 128, kind="x")
    assert km.default_config(1, 8192, 49152, 64, kind=h200) == km.default_config(1, 8192, 49152, 64, kind="x")


def test_float16_dot_keeps_large_activations_finite():
    """"asm16" rounds x to float16 after a 2^-6 prescale: activations far past float16's 65504 (here up to 1e6)
    give the same product as the float32 reference, to bf16 output rounding."""
    weight = _weight("int8", 11)
    x = (_x(12, (3,)).astype(jnp.float32) * jnp.array([1e6, 3e4, 1e-3])[:, None]).astype(jnp.bfloat16)
    cfg = km.Config(16, 128, 1, 2, form="xw", convert="asm16")
    y = km.matmul(x, *quant.kernel_operands(weight), config=cfg, interpret=True)
    ref = _float64_ref(x, weight)
    for row in range(3):
        assert np.isfinite(np.asarray(y[row], np.float32)).all()
        assert _rel_err(y[row], ref[row]) < 4e-3


def _run_ptx(asm: str, constraints: str, words: np.ndarray) -> list[np.ndarray]:
    """A NumPy model of the few PTX instructions in int8_matmul._ASM (xor, mov, prmt, sub.f32, sub.f16x2), run on
    32-bit input words: the registers $0… are the outputs, then the input, in the order of `constraints`."""
    n_out = len(constraints)
    regs = {f"${n_out}": words.astype(np.uint32)}

    def value(tok):
        if tok.startswith("0f"):
            return np.full(words.shape, int(tok[2:], 16), np.uint32)
        if tok.startswith("0x"):
            return np.full(words.shape, int(tok, 16), np.uint32)
        return regs[tok]

    body = asm.strip().lstrip("{").rstrip("}")
    for line in body.split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        if op == "xor.b32":
            regs[d] = value(src[0]) ^ value(src[1])
        elif op == "mov.b32":
            regs[d] = value(src[0])
        elif op == "prmt.b32":
            a, b, sel = value(src[0]), value(src[1]), int(src[2], 16)
            pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
            regs[d] = sum(pool[(sel >> (4 * i)) & 0x7] << np.uint32(8 * i) for i in range(4)).astype(np.uint32)
        elif op == "sub.f32":
            diff = value(src[0]).view(np.float32) - value(src[1]).view(np.float32)
            regs[d] = diff.astype(np.float32).view(np.uint32)
        elif op == "sub.f16x2":
            halves = [(value(t)[..., None] >> np.array([0, 16], np.uint32)) & 0xFFFF for t in src]
            a, b = [h.astype(np.uint16).view(np.float16).astype(np.float32) for h in halves]
            out = (a - b).astype(np.float16).view(np.uint16).astype(np.uint32)
            regs[d] = out[..., 0] | (out[..., 1] << 16)
        else:
            raise AssertionError(f"instruction {op} has no model here")
    return [regs[f"${i}"] for i in range(n_out)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_ptx_int8_conversion_is_exact(dtype):
    """Every int8 value in every byte position of a register comes out as that value, in order, first value in the
    low bits: the arithmetic the kernel's inline PTX does on the GPU (the interpreter uses a plain astype)."""
    asm, constraints = km._ASM[dtype]
    values = np.arange(-128, 128, dtype=np.int8)
    q = np.stack([np.roll(values, 37 * i) for i in range(4)], axis=1)  # [256, 4]: each value at each position
    words = q.view(np.uint8).astype(np.uint32) @ (np.uint32(1) << np.arange(0, 32, 8, dtype=np.uint32))
    out = _run_ptx(asm, constraints, words.astype(np.uint32))
    if dtype == "float32":
        got = np.stack([o.view(np.float32) for o in out], axis=1)
    else:
        halves = np.stack([(o >> s) & 0xFFFF for o in out for s in (0, 16)], axis=1).astype(np.uint32)
        got = (halves << 16).view(np.float32) if dtype == "bfloat16" else halves.astype(np.uint16).view(np.float16)
    np.testing.assert_array_equal(np.asarray(got, np.float32), q.astype(np.float32))


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
