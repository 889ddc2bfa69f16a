"""The cache-attention kernel, run in Pallas's interpreter on the CPU, against float64 numpy attention; its place in
the model (decode and chunked prefill equal the XLA path) and when it is chosen.

Small blocks (16 slots, 16 query rows) and a low program target force what the 72B shapes do on a GPU: several
splits of the slots merged by `combine`, slot counts that are not a multiple of the block, query blocks with
padding rows, stale values past every position, and a traced layer index into the stack. The GPU timings and the
72B-shape checks are in benchmarks/attention_gpu.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from qwen_jax import cache as kv_cache
from qwen_jax.kernels import cache_attention
from tests import reference_numpy
from tests.oracle import rel_err

SMALL = cache_attention.Config(block_s=16, block_t=16, min_programs=64)


def _stack(rng, shape, kind):
    """A random stacked k or v [L, B, H, T, hd] as the cache holds it, and its values in float64."""
    x = jnp.asarray(rng.normal(size=shape) * 2, jnp.float32)
    if kind == "float32":
        return x, np.asarray(x, np.float64), None
    q, scale = kv_cache.quantize(x)
    return kv_cache.pack(q), np.asarray(q, np.float64) * np.asarray(scale, np.float64)[..., None], scale


@pytest.mark.parametrize("kind", ["float32", "int8"])
@pytest.mark.parametrize("seq", [1, 20], ids=["decode", "chunk"])
def test_kernel_equals_float64_attention_over_the_cached_values(rng, kind, seq):
    """Float32 throughout against float64: ~1e-7; int8 compared with its own dequantized values (the scales are
    exact algebra), so the same bound holds."""
    layers, b, h, t, hd = 3, 2, 4, 70, 32  # 70 slots: 5 splits of 16 with a partial last block
    (k, k64, ks), (v, v64, vs) = (_stack(rng, (layers, b, h, t, hd), kind) for _ in range(2))
    q = rng.normal(size=(b, seq, h, hd)).astype(np.float32)
    positions = np.stack([np.arange(seq) + 7, np.arange(seq) + 60 - seq]).astype(np.int32)  # row 1 ends at 59
    layer = 1
    got = jax.jit(lambda *a: cache_attention.attend(*a, ks, vs, config=SMALL, interpret=True))(
        jnp.asarray(q), jnp.asarray(positions), k, v, jnp.int32(layer))
    mask = np.arange(t)[None, None, :] <= positions[:, :, None]
    want = reference_numpy.attention(q.astype(np.float64), k64[layer], v64[layer], mask)
    assert got.shape == q.shape and got.dtype == jnp.float32
    assert rel_err(np.asarray(got), want) < 1e-6


def test_a_query_that_sees_no_slot_gets_zeros_not_nan(rng):
    k = jnp.asarray(rng.normal(size=(1, 1, 2, 32, 16)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(1, 2, 2, 16)), jnp.float32)
    out = cache_attention.attend(q, jnp.asarray([[-1, 3]], jnp.int32), k, k, 0, config=SMALL, interpret=True)
    assert np.all(np.asarray(out[0, 0]) == 0) and np.all(np.isfinite(np.asarray(out)))


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return qwen_jax.load(tiny_dir, dtype="float32")


def _interpreted_kernel(monkeypatch):
    """Route the model's cache attention through the kernel in Pallas's interpreter, as a GPU would."""
    monkeypatch.setattr(kv_cache, "kernel_applies", lambda *args, **kwargs: True)
    attend = cache_attention.attend
    monkeypatch.setattr(cache_attention, "attend", lambda *args, **kwargs: attend(*args, **kwargs, interpret=True))


@pytest.mark.parametrize("kv_dtype", [None, jnp.int8], ids=["float32-cache", "int8-cache"])
def test_model_decoding_through_the_kernel_equals_the_xla_path(loaded, monkeypatch, kv_dtype):
    """A prefill over the cache (S = 8) and three decode steps, in both paths: same float32 math, ~1e-6."""
    model = dataclasses.replace(loaded[0], kv_dtype=kv_dtype)
    seqs = np.random.default_rng(2).integers(0, 151643, size=(2, 11)).astype(np.int32)

    def logits():
        module, cache = model.module, model.new_cache(2, 16)
        alpha = jnp.ones(2, jnp.float32)
        out, cache = module(model.params, seqs[:, :8], np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8)),
                            alpha, cache)
        outs = [out]
        for p in range(8, seqs.shape[1]):
            out, cache = module(model.params, seqs[:, p:p + 1], np.full((2, 1), p, np.int32), alpha, cache)
            outs.append(out)
        return np.concatenate([np.asarray(o)[..., :151851] for o in outs], axis=1)

    xla = logits()
    _interpreted_kernel(monkeypatch)
    assert rel_err(logits(), xla) < 1e-5


def test_kernel_is_chosen_only_where_it_runs():
    assert not kv_cache.kernel_applies(jnp.bfloat16, 128, jnp.bfloat16)  # the CPU backend
    if jax.default_backend() == "gpu":
        assert kv_cache.kernel_applies(jnp.bfloat16, 128, jnp.bfloat16)
        assert kv_cache.kernel_applies(jnp.bfloat16, 128, jnp.int8)
        assert not kv_cache.kernel_applies(jnp.float32, 128, jnp.float32)
        assert not kv_cache.kernel_applies(jnp.bfloat16, 32, jnp.int8)  # 8-value planes
