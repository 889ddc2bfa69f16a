"""Sampling: filters against transformers' logits warpers, and empirical distributions against targets."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from qwen_jax import sampling


def _params(n, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, seeds=None):
    full = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
    return sampling.SamplingParams(
        do_sample=full(do_sample, bool), temperature=full(temperature, jnp.float32), top_k=full(top_k, jnp.int32),
        top_p=full(top_p, jnp.float32), repetition_penalty=full(penalty, jnp.float32),
        seed=jnp.arange(n, dtype=jnp.uint32) if seeds is None else jnp.asarray(seeds, jnp.uint32))


@pytest.mark.parametrize("top_k,top_p", [(0, 0.8), (5, 1.0), (10, 0.5), (1, 0.9), (0, 0.05)])
def test_filters_match_transformers(top_k, top_p):
    logits = np.random.default_rng(top_k).standard_normal((4, 300)).astype(np.float32) * 3
    ours = np.asarray(sampling.filter_top_k_top_p(jnp.asarray(logits), jnp.full(4, top_k), jnp.full(4, top_p)))
    scores = torch.from_numpy(logits)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(scores.numpy()))


def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 50)).astype(np.float32)
    ids = rng.integers(0, 50, size=(2, 7))
    seen = np.zeros((2, 50), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    ours = sampling.apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), jnp.full(2, 1.3))
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(ids), torch.from_numpy(logits.copy()))
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-6)


def _target(logits, temperature, top_k, top_p):
    """The renormalized distribution, computed independently in float64 from the definitions."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z)
    keep = np.zeros(len(z), bool)
    keep[order[: top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0)
    p /= p.sum()
    mass_before = np.cumsum(p[order]) - p[order]
    nucleus = np.zeros(len(z), bool)
    nucleus[order[mass_before < top_p]] = True
    p = np.where(keep & nucleus, p, 0)
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8), (1.0, 5, 0.7)])
def test_empirical_distribution_matches_target(temperature, top_k, top_p):
    n = 8000
    logits = np.array([2.0, 1.5, 1.2, 1.0, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0], np.float32)
    params = _params(n, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = sampling.select(jnp.tile(logits, (n, 1)), jnp.zeros((n, 10), bool), params, jnp.zeros(n, jnp.int32))
    freq = np.bincount(np.asarray(tokens), minlength=10) / n
    want = _target(logits, temperature, top_k, top_p)
    assert np.all(freq[want == 0] == 0), "a filtered-out token was sampled"
    # Each frequency has standard deviation sqrt(p(1-p)/n) <= 0.0056 at n = 8000; 5 sigma => 0.028.
    assert np.max(np.abs(freq - want)) < 0.028, (freq, want)


def test_deterministic_per_seed_and_index():
    logits = jnp.tile(jnp.linspace(0, 1, 100), (3, 1))
    seen = jnp.zeros((3, 100), bool)
    a = sampling.select(logits, seen, _params(3, seeds=[7, 7, 8]), jnp.array([0, 0, 0]))
    b = sampling.select(logits, seen, _params(3, seeds=[7, 7, 8]), jnp.array([0, 0, 0]))
    np.testing.assert_array_equal(a, b)
    assert a[0] == a[1]


def test_greedy_rows_ignore_sampling_knobs():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64)), jnp.float32)
    params = _params(2, do_sample=False, temperature=5.0, top_p=0.1)
    np.testing.assert_array_equal(sampling.select(logits, jnp.zeros((2, 64), bool), params, jnp.zeros(2, jnp.int32)),
                                  np.argmax(np.asarray(logits), -1))
