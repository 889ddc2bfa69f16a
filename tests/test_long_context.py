"""What lets long contexts fit on one device: prefill self-attention (flash attention on a GPU), the int8 KV cache
(quantization, attention with scales, decoding, batching) and the embedding table kept in host memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from qwen_jax import attention
from qwen_jax import batch as batch_lib
from qwen_jax import cache as kv_cache
from qwen_jax.chat_format import chat_stop_ids
from qwen_jax.decoding import GenerationConfig, generate_tokens
from tests import reference_numpy
from tests.oracle import rel_err


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return qwen_jax.load(tiny_dir, dtype="float32")


def test_quantize_rounds_to_nearest_within_half_a_step(rng):
    x = rng.normal(size=(3, 5, 4, 32)).astype(np.float32) * rng.uniform(0.01, 100, size=(3, 5, 4, 1))
    x[0, 0, 0] = 0.0  # an all-zero vector must not divide by zero
    q, scale = kv_cache.quantize(jnp.asarray(x))
    q, scale = np.asarray(q, np.float64), np.asarray(scale, np.float64)
    assert np.abs(q).max() <= 127
    absmax = np.abs(x).max(-1)
    # float16 scales: the step is absmax / 127 rounded to 11 significant bits
    np.testing.assert_allclose(scale[absmax > 0], absmax[absmax > 0] / 127, rtol=2**-11)
    assert np.all(np.abs(x - q * scale[..., None]) <= scale[..., None] * 0.5 * (1 + 2**-9))
    assert np.all(q[0, 0, 0] == 0)


def test_attend_with_int8_keys_and_values_equals_attention_over_their_dequantized_values(rng):
    """Scales applied to scores and probabilities = attention over q * scale (float32 vs float64: ~1e-6)."""
    b, s, t, h, d = 2, 3, 7, 4, 16
    q = rng.normal(size=(b, s, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, h, t, d)).astype(np.float32) * 3 for _ in range(2))
    (kq, ks), (vq, vs) = kv_cache.quantize(jnp.asarray(k)), kv_cache.quantize(jnp.asarray(v))
    mask = np.arange(t)[None, None, :] <= np.array([[2, 4, 6], [0, 1, 6]])[:, :, None]
    out = attention.attend(jnp.asarray(q), kq, vq, jnp.asarray(mask), ks, vs)
    deq = [np.asarray(a, np.float64) * np.asarray(sc, np.float64)[..., None] for a, sc in ((kq, ks), (vq, vs))]
    want = reference_numpy.attention(q.astype(np.float64), *deq, mask)
    assert rel_err(np.asarray(out), want) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int8], ids=["bf16", "int8"])
@pytest.mark.parametrize("start", [[0, 6], [7]], ids=["two-rows", "one-row"])
def test_write_then_read_round_trips_at_each_rows_start_and_leaves_other_slots(loaded, rng, dtype, start):
    """k/v go in as the model makes them, [B, S, H, hd], and come out in the cache's [B, H, T, hd] at slots
    start[b] … start[b] + S - 1; bf16 exactly, int8 within half a step of its scale; every other slot, and the
    other layers, keep what they held (one row: up to the last slot)."""
    config = loaded[0].config.replace(num_hidden_layers=3)
    start = np.array(start)
    b, s, t, h, hd = len(start), 3, 10, config.num_attention_heads, config.head_dim
    # stale values everywhere, so that a write to a wrong slot shows
    cache = {name: jnp.asarray(rng.normal(size=a.shape) * 50, a.dtype)
             for name, a in kv_cache.init_cache(config, b, t, dtype).items()}
    new = [jnp.asarray(rng.normal(size=(b, s, h, hd)) * 3, jnp.bfloat16) for _ in range(2)]
    written = jax.jit(kv_cache.write)(cache, jnp.int32(1), *new, jnp.asarray(start, jnp.int32))
    assert kv_cache.max_len(written) == t
    before = {name: np.asarray(a, np.float64) for name, a in kv_cache.read(cache, jnp.int32(1)).items()}
    got = {name: np.asarray(a, np.float64) for name, a in kv_cache.read(written, jnp.int32(1)).items()}
    assert got["k"].shape == (b, h, t, hd) and (dtype != jnp.int8 or got["k_scale"].shape == (b, h, t))
    fresh = np.zeros((b, h, t), bool)  # the slots written
    for row in range(b):
        fresh[row, :, start[row]:start[row] + s] = True
    for name, x in zip(("k", "v"), new):
        want = np.asarray(x, np.float64).transpose(0, 2, 1, 3)  # [B, H, S, hd]
        for row in range(b):
            stored = got[name][row, :, start[row]:start[row] + s]  # [H, S, hd]
            if dtype == jnp.int8:
                scale = got[f"{name}_scale"][row, :, start[row]:start[row] + s, None]  # [H, S, 1]
                assert np.all(np.abs(stored * scale - want[row]) <= scale * 0.5 * (1 + 2**-9))
            else:
                np.testing.assert_array_equal(stored, want[row])
    for name in got:
        np.testing.assert_array_equal(got[name][~fresh], before[name][~fresh])
        np.testing.assert_array_equal(np.asarray(written[name])[[0, 2]], np.asarray(cache[name])[[0, 2]])


def _decode_logits(model, seqs, prompt_len, prefill):
    """Prefill seqs[:, :prompt_len] into a fresh cache, then feed the rest one token at a time; all logits."""
    batch, total = seqs.shape
    module, cache = model.module, model.new_cache(batch, 16)
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (batch, prompt_len))
    alpha = jnp.ones(batch, jnp.float32)
    logits, cache = module(model.params, seqs[:, :prompt_len], positions, alpha, cache, prefill=prefill)
    out = [np.asarray(logits)]
    for p in range(prompt_len, total):
        logits, cache = module(model.params, seqs[:, p:p + 1], np.full((batch, 1), p, np.int32), alpha, cache)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)[..., :151851]


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill-self-attention", "prefill-over-cache"])
def test_prefill_modes_equal_the_full_forward(loaded, prefill):
    model, _ = loaded
    seqs = np.random.default_rng(0).integers(0, 151643, size=(2, 12)).astype(np.int32)
    full = np.asarray(model.logits(seqs))[..., :151851]
    assert rel_err(_decode_logits(model, seqs, 8, prefill), full) <= 1e-4


def test_int8_cache_decoding_stays_close_to_the_full_forward(loaded):
    """Per-(token, head) absmax int8 moves each key/value by at most half a step (≤ 1/254 of the vector's
    largest magnitude, ~0.2% RMS); through softmax and two layers the logits move by about as much. 1e-2 is
    five times the error measured here (float32 model), and a bf16 cache would already be at ~4e-3."""
    model, _ = loaded
    model8 = dataclasses.replace(model, kv_dtype=jnp.int8)
    cache = model8.new_cache(2, 16)
    assert cache["k"].dtype == jnp.int32 and cache["k_scale"].shape == cache["k"].shape[:-1]  # int8 × 4 words
    seqs = np.random.default_rng(1).integers(0, 151643, size=(2, 12)).astype(np.int32)
    full = np.asarray(model.logits(seqs))[..., :151851]
    got = _decode_logits(model8, seqs, 4, prefill=True)
    err = rel_err(got[:, 4:], full[:, 4:])  # the decode steps read the int8 cache
    assert 1e-6 < err <= 1e-2


def test_int8_cache_generation_and_batching_agree(loaded):
    """The batch engine with an int8 cache equals generate_tokens with it (insert_rows moves the scales too)."""
    model, tok = loaded
    model8 = dataclasses.replace(model, kv_dtype=jnp.int8)
    gen = GenerationConfig.resolve(model.generation_config, max_new_tokens=6, do_sample=False)
    stops = [[t] for t in chat_stop_ids(tok)]
    prompts = [tok.encode("the quick brown fox" * n) for n in (1, 3, 2)]
    engine = batch_lib.Engine(model8, gen, max_prompt_len=max(map(len, prompts)), stop_sequences=stops,
                              num_slots=2, chunk=3, max_group=1)
    results = {r.id: r.tokens for r in engine.run([batch_lib.Request(i, p, 0) for i, p in enumerate(prompts)])}
    for i, p in enumerate(prompts):
        (alone,) = list(generate_tokens(model8, [p], gen, stops))[-1]
        assert results[i] == alone.tokens


def test_load_kv_dtype_option(tiny_dir):
    model, _ = qwen_jax.load(tiny_dir, dtype="float32", kv_dtype="int8")
    assert model.kv_dtype == jnp.int8 and model.new_cache(1, 16)["v_scale"].dtype == kv_cache.SCALE_DTYPE
    with pytest.raises(ValueError, match="kv_dtype 'int4' not supported; use 'int8'"):
        qwen_jax.load(tiny_dir, kv_dtype="int4")


def test_flash_attention_is_chosen_only_where_it_runs():
    assert not attention.flash_applies(jnp.bfloat16, 128)  # the CPU backend
    if jax.default_backend() == "gpu":
        assert attention.flash_applies(jnp.bfloat16, 128)
        assert not attention.flash_applies(jnp.float32, 128)
        assert not attention.flash_applies(jnp.bfloat16, 96)


def test_embedding_on_host_gives_the_same_logits_and_tokens(loaded, tiny_dir):
    model, tok = loaded
    host, _ = qwen_jax.load(tiny_dir, dtype="float32", embedding_on_host=True)
    assert "wte" not in host.params and isinstance(host.host_embedding.table, np.ndarray)
    ids = np.random.default_rng(2).integers(0, 151643, size=(2, 9)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(host.logits(ids)), np.asarray(model.logits(ids)))
    gen = GenerationConfig.resolve(model.generation_config, max_new_tokens=8, do_sample=False)
    prompt = tok.encode("the quick brown fox")
    (want,), (got,) = (list(generate_tokens(m, [prompt], gen))[-1] for m in (model, host))
    assert got.tokens == want.tokens


def test_embedding_on_host_refuses_a_mesh_of_several_devices(tiny_dir):
    from qwen_jax import sharding

    mesh = sharding.make_mesh({"data": 2, "model": 4})
    with pytest.raises(ValueError, match="one device; this mesh spans 8 devices"):
        qwen_jax.load(tiny_dir, dtype="float32", mesh=mesh, strategy="dp_tp", embedding_on_host=True)
