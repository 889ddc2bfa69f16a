import os

# 8 simulated CPU devices for the sharding tests; set before anything imports jax. Single-device code uses
# the first device, so the other tests are unaffected.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

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


@pytest.fixture(scope="session")
def checkpoint_pair(tmp_path_factory):
    """make(config, seed, group_size) -> {"float": dir, "gptq": dir}: the same model as a float and as a GPTQ Int8
    checkpoint in the published layouts, for the tests that run both kinds on several meshes."""
    def make(config, seed: int, group_size: int) -> dict:
        root = tmp_path_factory.mktemp("checkpoint-pair")
        return {"float": testing.write_float_checkpoint(root / "float", config, seed=seed),
                "gptq": testing.write_gptq_checkpoint(root / "gptq", config, seed=seed, group_size=group_size)}

    return make


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- GPTQ Int8 ------------------------------------------------------------------------------------------------------

GPTQ_GROUP = 32  # divides every K of the tiny presets (64, 128); the published 128 does not


@pytest.fixture(scope="session")
def tiny_gptq_dir(tmp_path_factory, tiny_config):
    """A tiny GPTQ Int8 checkpoint in the published layout (v1, sym, 2023 zero biases, 2 shards), seed 0."""
    return testing.write_gptq_checkpoint(tmp_path_factory.mktemp("tiny-gptq"), tiny_config, seed=0,
                                         group_size=GPTQ_GROUP)


@pytest.fixture(scope="session")
def tiny_gptq_tensors(tiny_config):
    """The tiny GPTQ checkpoint's weights dequantized in memory, under float checkpoint names."""
    return testing.gptq_dequantized_tensors(tiny_config, seed=0, group_size=GPTQ_GROUP)


@pytest.fixture(scope="session")
def hf_tiny_gptq(tiny_config, tiny_gptq_tensors):
    from tests.oracle import qwen2_from_tensors

    return qwen2_from_tensors(tiny_config, tiny_gptq_tensors)


@pytest.fixture(scope="session")
def tiny_gptq_converted(tmp_path_factory, tiny_gptq_dir):
    """`tiny_gptq_dir` converted to the orbax layout."""
    from convert import convert

    return convert(tiny_gptq_dir, tmp_path_factory.mktemp("converted") / "tiny-gptq", progress=False)


@pytest.fixture(scope="session")
def autogptq():
    """AutoGPTQ 0.7.1's QuantLinear. Unobtainable (no network, no pip): a skip locally, a failure in CI."""
    from tests.oracle import OracleUnavailable, autogptq_quant_linear

    try:
        return autogptq_quant_linear()
    except OracleUnavailable as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the AutoGPTQ oracle is required in CI: {e}")
        pytest.skip(f"the AutoGPTQ oracle is unavailable: {e}")


@pytest.fixture
def device_memory(monkeypatch):
    """Set `.free` (bytes) to make the memory preflight see that much free device memory: the CPU backend reports
    none, so without this nothing is ever refused. `.free = None` reads the device again."""
    import types

    from qwen_jax import cache as kv_cache

    memory = types.SimpleNamespace(free=None)
    preflight = kv_cache.preflight
    monkeypatch.setattr(kv_cache, "preflight", lambda *a, **k: preflight(*a, **k, free_bytes=memory.free))
    return memory


@pytest.fixture
def prefill_calls(monkeypatch):
    """The [B, C] shapes of the ids of every prefill chunk run from here on, in order."""
    from qwen_jax import decoding

    calls = []
    original = decoding._prefill_chunk
    monkeypatch.setattr(decoding, "_prefill_chunk", lambda *a, **k: calls.append(a[2].shape) or original(*a, **k))
    return calls
