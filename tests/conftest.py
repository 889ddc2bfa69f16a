import numpy as np
import pytest

from qwen_jax import testing
from qwen_jax.config import preset


@pytest.fixture(scope="session")
def tiny_config():
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_config):
    """A tiny float16 checkpoint in the published layout (2 shards + index), seed 0."""
    return testing.write_float_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_config, seed=0)


@pytest.fixture(scope="session")
def tiny_tensors(tiny_config):
    return testing.float_tensors(tiny_config, seed=0)


@pytest.fixture(scope="session")
def hf_tiny(tiny_config, tiny_tensors):
    from tests.oracle import qwen2_from_tensors

    return qwen2_from_tensors(tiny_config, tiny_tensors)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
