"""Logits of qwen_jax against transformers' Qwen2 holding the same weights (float32, CPU)."""

import numpy as np
import pytest

import qwen_jax
from tests.oracle import qwen2_logits, rel_err

REAL = 151851  # columns past this are padding rows, masked to -inf by qwen_jax


@pytest.fixture(scope="module")
def tiny_f32(tiny_dir):
    return qwen_jax.load(tiny_dir, dtype="float32")[0]


@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 17), (3, 9), (4, 33)])
def test_float32_logits_match_qwen2(tiny_f32, hf_tiny, rng, batch, seq):
    ids = rng.integers(0, REAL, size=(batch, seq))
    ours = np.asarray(tiny_f32.logits(ids))
    theirs = qwen2_logits(hf_tiny, ids)
    assert ours.shape == theirs.shape == (batch, seq, tiny_f32.config.vocab_size)
    assert ours.dtype == np.float32
    # float32 end to end: differences are summation order only, ~1e-6 relative.
    assert rel_err(ours[..., :REAL], theirs[..., :REAL]) <= 1e-4


def test_padded_vocab_rows_are_masked(tiny_f32, rng):
    logits = np.asarray(tiny_f32.logits(rng.integers(0, REAL, size=(2, 5))))
    assert np.all(np.isneginf(logits[..., REAL:]))
    assert np.all(np.isfinite(logits[..., :REAL]))


def test_bfloat16_top1_agrees_with_float32_reference(tiny_dir, hf_tiny, rng):
    model, _ = qwen_jax.load(tiny_dir)  # bfloat16 by default
    ids = rng.integers(0, REAL, size=(8, 64))
    ours = np.asarray(model.logits(ids))
    assert ours.dtype == np.float32  # logits are float32 whatever the activation dtype
    theirs = qwen2_logits(hf_tiny, ids)
    agreement = np.mean(ours[..., :REAL].argmax(-1) == theirs[..., :REAL].argmax(-1))
    assert agreement >= 0.99, agreement
