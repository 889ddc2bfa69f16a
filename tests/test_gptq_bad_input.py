"""Bad GPTQ checkpoints fail before any weight is placed, with errors that name the file/tensor and the expectation."""

import json
import shutil

import numpy as np
import pytest

import qwen_jax
from qwen_jax.checkpoint import CheckpointError
from tests.checkpoint_edits import rewrite_tensors


@pytest.fixture
def ckpt(tmp_path, tiny_gptq_dir):
    directory = tmp_path / "gptq"
    shutil.copytree(tiny_gptq_dir, directory)
    return directory


def edit_quantize_config(directory, **changes):
    """Apply `changes` to quantize_config.json and config.json's quantization_config alike (None deletes a key)."""
    raw = json.loads((directory / "config.json").read_text())
    qc = json.loads((directory / "quantize_config.json").read_text())
    for target in (qc, raw["quantization_config"]):
        for key, value in changes.items():
            target.pop(key, None) if value is None else target.__setitem__(key, value)
    (directory / "quantize_config.json").write_text(json.dumps(qc))
    (directory / "config.json").write_text(json.dumps(raw))


def test_missing_qzeros(ckpt):
    rewrite_tensors(ckpt, "transformer.h.1.mlp.w1.qzeros", lambda t: t.pop("transformer.h.1.mlp.w1.qzeros"))
    with pytest.raises(CheckpointError, match=r"missing.*transformer\.h\.1\.mlp\.w1\.qzeros"):
        qwen_jax.load(ckpt)


@pytest.mark.parametrize("changes,message", [
    ({"bits": 4}, r"quantize_config\.json: bits is 4; only 8-bit"),
    ({"sym": False}, r"quantize_config\.json: sym is False; only symmetric"),
    ({"checkpoint_format": "gptq_v2"}, r"quantize_config\.json: checkpoint_format 'gptq_v2' .* not supported"),
    ({"checkpoint_format": "marlin"}, r"quantize_config\.json: unknown checkpoint_format 'marlin'"),
    ({"is_marlin_format": True}, r"quantize_config\.json: is_marlin_format True is not supported"),
    ({"quant_method": "awq"}, r"quantize_config\.json: quant_method 'awq' is not supported"),
    ({"act_group_aware": True}, r"quantize_config\.json: unknown quantization keys \['act_group_aware'\]"),
    ({"group_size": -1}, r"quantize_config\.json: group_size -1 is not supported"),
    ({"group_size": 48}, r"quantize_config\.json: group_size 48 is not supported"),
])
def test_unsupported_quantization_settings(ckpt, changes, message):
    edit_quantize_config(ckpt, **changes)
    with pytest.raises(CheckpointError, match=message):
        qwen_jax.load(ckpt)


def test_settings_in_config_json_alone_are_read(ckpt):
    (ckpt / "quantize_config.json").unlink()
    raw = json.loads((ckpt / "config.json").read_text())
    raw["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json \(quantization_config\): checkpoint_format 'gptq_v2'"):
        qwen_jax.load(ckpt)


def test_the_two_configs_disagree(ckpt):
    qc = json.loads((ckpt / "quantize_config.json").read_text())
    (ckpt / "quantize_config.json").write_text(json.dumps({**qc, "group_size": 64}))
    with pytest.raises(CheckpointError, match=r"disagree: group_size 64 vs 32"):
        qwen_jax.load(ckpt)


def test_scales_of_the_wrong_shape(ckpt):
    # group_size 64 in both configs: the stored scales (group 32) have twice the rows it implies.
    edit_quantize_config(ckpt, group_size=64)
    with pytest.raises(CheckpointError, match=r"model-0000\d-of-00002\.safetensors: tensor transformer\.h\.0\.attn\."
                                              r"c_attn\.scales has shape \[2, 192\], expected \[1, 192\]"):
        qwen_jax.load(ckpt)


@pytest.mark.parametrize("name,index,value,message", [
    ("transformer.h.1.mlp.c_proj.scales", (3, 17), np.nan,
     r"non-finite scale nan at \[group, column\] \[3, 17\]"),
    # byte 2 (bits 16-23) of word 2 = column 10: stored 128, zero 129
    ("transformer.h.0.attn.c_proj.qzeros", (1, 2), 0x7F807F7F,
     r"zero points \[128, 128, 129, 128\] at group 1, columns 8\.\.11"),
], ids=["nan-scale", "zero-point-other-than-128"])
def test_a_bad_value_is_named_with_its_place(ckpt, name, index, value, message):
    def corrupt(t):
        t[name] = t[name].copy()
        t[name][index] = value

    shard = rewrite_tensors(ckpt, name, corrupt)
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor {name}: " + message):
        qwen_jax.load(ckpt)


def test_nonzero_bias_on_a_bias_free_linear(ckpt):
    name = "transformer.h.1.mlp.w2.bias"
    rewrite_tensors(ckpt, name, lambda t: t.__setitem__(name, np.full_like(t[name], 0.5)))
    with pytest.raises(CheckpointError, match=rf"tensor {name} is not all zeros"):
        qwen_jax.load(ckpt)


def test_qweight_of_the_wrong_dtype(ckpt):
    name = "transformer.h.1.mlp.w1.qweight"
    rewrite_tensors(ckpt, name, lambda t: t.__setitem__(name, t[name].view(np.float32)))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has dtype float32, expected one of \['int32'\]"):
        qwen_jax.load(ckpt)
