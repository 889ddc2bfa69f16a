"""Dynamic NTK and logn attention (1.8B/7B/14B configs) against a float64 NumPy forward from the spec."""

import numpy as np
import pytest

import qwen_jax
from qwen_jax import testing
from qwen_jax.config import preset
from tests.oracle import rel_err
from tests.reference_numpy import forward

REAL = 151851


@pytest.fixture(scope="module")
def ntk_config():
    config = preset("tiny-ntk")
    assert config.seq_length == 16 and config.use_dynamic_ntk and config.use_logn_attn
    return config


@pytest.fixture(scope="module")
def ntk_tensors(ntk_config):
    return testing.float_tensors(ntk_config, seed=3)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(7).integers(0, REAL, size=(2, 40))  # 40 tokens > 2 × seq_length: alpha = 7


@pytest.mark.parametrize("ntk,logn", [(True, True), (True, False), (False, True), (False, False)])
def test_matches_float64_reference(tmp_path, ntk_config, ntk_tensors, ids, ntk, logn):
    config = ntk_config.replace(use_dynamic_ntk=ntk, use_logn_attn=logn)
    directory = testing.write_float_checkpoint(tmp_path, config, seed=3, num_shards=1)
    model, _ = qwen_jax.load(directory, dtype="float32")
    ours = np.asarray(model.logits(ids))[..., :REAL]
    want = forward(config, ntk_tensors, ids)[..., :REAL]
    assert rel_err(ours, want) <= 1e-4


def test_flags_change_the_logits(ntk_config, ntk_tensors, ids):
    with_flags = forward(ntk_config, ntk_tensors, ids)
    for change in ({"use_dynamic_ntk": False}, {"use_logn_attn": False}):
        without = forward(ntk_config.replace(**change), ntk_tensors, ids)
        assert rel_err(without, with_flags) > 1e-2, change
    # Within the training length both are identities: the first 16 positions see no difference from logn.
    no_logn = forward(ntk_config.replace(use_logn_attn=False), ntk_tensors, ids)
    np.testing.assert_allclose(no_logn[:, :16], with_flags[:, :16], rtol=1e-12, atol=1e-12)


def test_ntk_alpha_formula(ntk_config):
    assert ntk_config.ntk_alpha(16) == 1.0  # log2(1) + 1 = 1 -> 2^1 - 1
    assert ntk_config.ntk_alpha(17) == 3.0
    assert ntk_config.ntk_alpha(32) == 3.0
    assert ntk_config.ntk_alpha(40) == 7.0
    assert preset("72b").ntk_alpha(100_000) == 1.0  # 72B has dynamic NTK off
