"""Bad checkpoints fail before any weight is placed, with errors that name the file/tensor and the expectation."""

import json
import shutil

import numpy as np
import pytest

import qwen_jax
from qwen_jax.checkpoint.safetensors_io import CheckpointError
from qwen_jax.config import ConfigError
from tests.checkpoint_edits import rewrite_tensors


@pytest.fixture
def ckpt(tmp_path, tiny_dir):
    directory = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, directory)
    return directory


W1 = "transformer.h.1.mlp.w1.weight"  # its shard is the one the tests rewrite


@pytest.fixture(params=["tiny_dir", "tiny_gptq_dir"], ids=["float", "gptq"])
def any_ckpt(request, tmp_path):
    """A copy of the float or the GPTQ tiny checkpoint: for errors of the shared safetensors layer."""
    directory = tmp_path / "ckpt"
    shutil.copytree(request.getfixturevalue(request.param), directory)
    return directory


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json.*not found"):
        qwen_jax.load(ckpt)


def test_config_missing_key(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    del raw["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="hidden_size"):
        qwen_jax.load(ckpt)


def test_config_heads_times_kv_channels_must_be_hidden_size(ckpt):
    """Every Qwen checkpoint has heads × kv_channels == hidden_size; a config.json without it is refused by name
    (a QwenConfig built in code may differ: one device's tensor-parallel shard, sharding_lab.tp_shard_config)."""
    raw = json.loads((ckpt / "config.json").read_text())
    raw["kv_channels"] //= 2
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config\.json: num_attention_heads \(2\) × kv_channels \(16\) must equal "
                                          r"hidden_size \(64\)"):
        qwen_jax.load(ckpt)


def test_missing_tensor(ckpt):
    rewrite_tensors(ckpt, W1, lambda t: t.pop(W1))
    with pytest.raises(CheckpointError, match=r"missing.*transformer\.h\.1\.mlp\.w1\.weight"):
        qwen_jax.load(ckpt)


def test_tensor_listed_in_index_but_not_in_shard(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = rewrite_tensors(ckpt, W1, lambda t: t.pop(W1))
    index["weight_map"]["transformer.h.1.mlp.w1.weight"] = shard
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{shard}.*transformer\.h\.1\.mlp\.w1\.weight.*not in the shard"):
        qwen_jax.load(ckpt)


def test_wrong_shape(ckpt):
    def shrink(t):
        t["transformer.h.1.mlp.w1.weight"] = t["transformer.h.1.mlp.w1.weight"][:-1]

    shard = rewrite_tensors(ckpt, W1, shrink)
    with pytest.raises(CheckpointError, match=rf"{shard}.*transformer\.h\.1\.mlp\.w1\.weight.*\[127, 64\].*expected \[128, 64\]"):
        qwen_jax.load(ckpt)


def test_wrong_dtype(ckpt):
    def to_int(t):
        t["transformer.h.1.ln_2.weight"] = t["transformer.h.1.ln_2.weight"].astype(np.int32)

    rewrite_tensors(ckpt, "transformer.h.1.ln_2.weight", to_int)
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.ln_2\.weight.*dtype int32"):
        qwen_jax.load(ckpt)


def test_truncated_shard(any_ckpt):
    shard = sorted(any_ckpt.glob("model-*.safetensors"))[-1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated: tensor .* needs bytes up to {size}, the file has {size - 1000}"):
        qwen_jax.load(any_ckpt)


def test_missing_shard(ckpt):
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: shard listed in .* is missing"):
        qwen_jax.load(ckpt)


def test_unexpected_tensor(ckpt):
    def add(t):
        t["transformer.h.7.ln_1.weight"] = np.ones(64, np.float16)

    rewrite_tensors(ckpt, W1, add)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*transformer\.h\.7\.ln_1\.weight"):
        qwen_jax.load(ckpt)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        qwen_jax.load(tmp_path / "nope")


def test_bad_dtype_argument(tiny_dir):
    with pytest.raises(ValueError, match="dtype 'int4' not supported"):
        qwen_jax.load(tiny_dir, dtype="int4")
