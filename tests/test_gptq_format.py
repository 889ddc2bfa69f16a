"""The GPTQ v1 format: our files and our reading of them against AutoGPTQ 0.7.1's own dequantizer."""

import jax
import numpy as np
import pytest
from safetensors import safe_open

import qwen_jax
from qwen_jax import quant, testing
from qwen_jax.checkpoint import CheckpointError
from qwen_jax.checkpoint.gptq import Int8FromPacked
from tests.conftest import GPTQ_GROUP
from tests.oracle import autogptq_dequantize

LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


def _read_linear(directory, name):
    """qweight, qzeros, scales, g_idx of one linear, read with the safetensors library (not our reader)."""
    tensors = {}
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, framework="np") as f:
            tensors.update({k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")})
    return tensors


def _our_weight(params, layer, part):
    """W [K, N] float32 as qwen_jax computes it from the device layout."""
    module, name = part.split(".")
    p = params["layers"][module]["w1w2" if name in ("w1", "w2") else name]  # stacked over layers
    w = np.asarray(quant.dequantize(p["qvalue"][layer], p["scales"][layer], np.float32))
    if name in ("w1", "w2"):
        w = w[:, ("w1", "w2").index(name)]
    return w.reshape(w.shape[0], -1)


@pytest.fixture(scope="module")
def gptq_f32(tiny_gptq_dir):
    return qwen_jax.load(tiny_gptq_dir, dtype="float32")[0]


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("part", LINEARS)
def test_dequantized_weights_match_autogptq(autogptq, tiny_gptq_dir, tiny_gptq_tensors, gptq_f32, layer, part):
    name = f"transformer.h.{layer}.{part}"
    theirs = autogptq_dequantize(autogptq, _read_linear(tiny_gptq_dir, name), GPTQ_GROUP)  # [K, N]
    np.testing.assert_array_equal(_our_weight(gptq_f32.params, layer, part), theirs)
    # The in-memory weights that the logits oracle is fed are the same numbers.
    np.testing.assert_array_equal(tiny_gptq_tensors[f"{name}.weight"].T, theirs)


def test_desc_act_fixture_matches_autogptq_and_is_rejected(autogptq, tmp_path, tiny_config):
    directory = testing.write_gptq_checkpoint(tmp_path / "act-order", tiny_config, group_size=GPTQ_GROUP,
                                              desc_act=True)
    tensors = testing.gptq_dequantized_tensors(tiny_config, group_size=GPTQ_GROUP, desc_act=True)
    for part in LINEARS:
        name = f"transformer.h.1.{part}"
        linear = _read_linear(directory, name)
        assert not np.array_equal(linear["g_idx"], np.arange(len(linear["g_idx"])) // GPTQ_GROUP)
        np.testing.assert_array_equal(tensors[f"{name}.weight"].T, autogptq_dequantize(autogptq, linear, GPTQ_GROUP))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_attn\.g_idx: input row \d+ is in group "
                                              r"\d+, not \d+ = row // group_size: act-order \(desc_act\)"):
        qwen_jax.load(directory)


def test_checkpoint_without_zero_biases_loads_the_same(tmp_path, tiny_config, gptq_f32):
    directory = testing.write_gptq_checkpoint(tmp_path / "no-bias", tiny_config, group_size=GPTQ_GROUP,
                                              zero_bias=False)
    model = qwen_jax.load(directory, dtype="float32")[0]
    for ours, want in zip(*(jax.tree.leaves(m.params) for m in (model, gptq_f32))):
        np.testing.assert_array_equal(ours, want)


def test_published_files_and_layout(tiny_gptq_dir, gptq_f32, tiny_config):
    c_attn = _read_linear(tiny_gptq_dir, "transformer.h.0.attn.c_attn")
    d = tiny_config.hidden_size
    assert {k: (v.dtype.name, v.shape) for k, v in c_attn.items()} == {
        "qweight": ("int32", (d // 4, 3 * d)), "qzeros": ("int32", (d // GPTQ_GROUP, 3 * d // 4)),
        "scales": ("float16", (d // GPTQ_GROUP, 3 * d)), "g_idx": ("int32", (d,)), "bias": ("float16", (3 * d,))}
    assert np.all(c_attn["qzeros"].view(np.uint32) == 0x7F7F7F7F)
    p = gptq_f32.params["layers"]["attn"]["c_attn"]
    assert (p["qvalue"].dtype, p["scales"].dtype, p["bias"].dtype) == (np.int8, np.float16, np.float32)
    layers = tiny_config.num_hidden_layers
    assert p["qvalue"].shape == (layers, d, 3, 2, 32) and p["scales"].shape == (layers, d // GPTQ_GROUP, 3, 2, 32)
    assert gptq_f32.quant_group == GPTQ_GROUP


@pytest.mark.parametrize("rows", [slice(None), slice(0, 4), slice(3, 9), slice(5, 6), slice(13, 16)])
def test_int8_unpacking_reads_any_row_slice(rng, rows):
    q = rng.integers(0, 256, (16, 3, 5), dtype=np.uint8)
    lazy = Int8FromPacked(testing.pack_rows(q.reshape(16, 15)).reshape(4, 3, 5))
    want = (q.astype(np.int16) - 128).astype(np.int8)
    np.testing.assert_array_equal(lazy[(rows, slice(1, 3))], want[rows, 1:3])
    assert lazy.shape == (16, 3, 5) and lazy.dtype == np.int8
