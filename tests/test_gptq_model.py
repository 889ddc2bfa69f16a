"""A GPTQ Int8 checkpoint in qwen_jax: logits against transformers' Qwen2 holding the dequantized weights, directly,
after conversion and on 8 devices; and the device memory it takes."""

import gc
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

import qwen_jax
from qwen_jax import testing
from qwen_jax.config import preset
from tests.oracle import qwen2_logits, rel_err

REAL = 151851
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(7).integers(0, REAL, size=(3, 21))


@pytest.fixture(scope="module")
def want(hf_tiny_gptq, ids):
    return qwen2_logits(hf_tiny_gptq, ids)


@pytest.mark.parametrize("which", ["gptq", "converted"])
def test_float32_logits_match_qwen2(request, which, ids, want):
    directory = request.getfixturevalue({"gptq": "tiny_gptq_dir", "converted": "tiny_gptq_converted"}[which])
    model, _ = qwen_jax.load(directory, dtype="float32")
    assert model.quant_group == 32
    ours = np.asarray(model.logits(ids))
    assert rel_err(ours[..., :REAL], want[..., :REAL]) <= 1e-4


def test_bfloat16_load_keeps_int8_and_float16_scales(tiny_gptq_converted, tiny_gptq_dir):
    for directory in (tiny_gptq_dir, tiny_gptq_converted):
        model, _ = qwen_jax.load(directory)
        dtypes = {path[-1]: leaf.dtype for path, leaf in traverse_util.flatten_dict(model.params).items()}
        assert dtypes == {"qvalue": np.int8, "scales": np.float16, "bias": jax.numpy.bfloat16,
                          "weight": jax.numpy.bfloat16, "embedding": jax.numpy.bfloat16, "kernel": jax.numpy.bfloat16}


_EIGHT_DEVICES = r"""
import sys
import jax
import numpy as np
import qwen_jax
from qwen_jax import sharding

assert jax.device_count() == 8, jax.devices()
ids_file, gptq_dir, converted_dir, out_file = sys.argv[1:]
mesh = sharding.make_mesh({"model": 8})
logits = {}
for name, path in (("gptq", gptq_dir), ("converted", converted_dir)):
    model, _ = qwen_jax.load(path, dtype="float32", mesh=mesh, strategy="replicated")
    qvalue = model.params["layers"]["mlp"]["w1w2"]["qvalue"]
    assert qvalue.dtype == np.int8 and len(qvalue.sharding.device_set) == 8, qvalue.sharding
    logits[name] = np.asarray(model.logits(np.load(ids_file)))
np.savez(out_file, **logits)
"""


def test_eight_cpu_devices(tmp_path, tiny_gptq_dir, tiny_gptq_converted, ids, want):
    # The device count is fixed when jax starts, so 8 simulated CPU devices need a fresh process.
    np.save(tmp_path / "ids.npy", ids)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"}
    out = tmp_path / "logits.npz"
    result = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(tmp_path / "ids.npy"), str(tiny_gptq_dir),
                             str(tiny_gptq_converted), str(out)], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = np.load(out)
    for name in ("gptq", "converted"):
        assert rel_err(logits[name][..., :REAL], want[..., :REAL]) <= 1e-4, name


def _bytes_per_device() -> Counter:
    gc.collect()
    used = Counter()
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            used[shard.device] += shard.data.nbytes
    return used


def test_device_memory_is_int8_plus_scales_plus_floats(tmp_path):
    # A small vocabulary so that the linears dominate: a float copy of them would be +150%, not +1% as in "tiny".
    config = preset("tiny").replace(hidden_size=256, num_attention_heads=8, intermediate_size=2048, vocab_size=512)
    group = 32
    directory = testing.write_gptq_checkpoint(tmp_path / "wide", config, group_size=group)
    d, f, v, layers = config.hidden_size, config.mlp_width, config.vocab_size, config.num_hidden_layers
    int8 = layers * (d * 3 * d + d * d + d * 2 * f + f * d)
    scales = int8 // group * 2
    floats = (2 * v * d + layers * (2 * d + 3 * d) + d) * 2  # bfloat16: embeddings, lm_head, norms, c_attn bias
    before = _bytes_per_device()
    model, _ = qwen_jax.load(directory)  # every array (any stray copy included) that loading left on the devices
    used = _bytes_per_device()
    used.subtract(before)
    expected = int8 + scales + floats
    for device in model.mesh.devices.flat:  # replicated: each device holds the whole model
        assert abs(used[device] - expected) <= 0.05 * expected, (device, used[device], expected)
    del model
