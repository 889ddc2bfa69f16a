"""Every built-in strategy on several mesh shapes of 8 simulated CPU devices equals the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from qwen_jax import sharding, sharding_lab, testing
from qwen_jax.config import preset
from qwen_jax.decoding import GenerationConfig, generate_tokens
from qwen_jax.model import abstract_params
from tests.oracle import rel_err

REAL = 151851
MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]
# 8 heads, an MLP of 256 and a vocabulary of 151936 all divide by 8, so every strategy applies to every mesh.
CONFIG = preset("tiny").replace(hidden_size=128, num_attention_heads=8, kv_channels=16, intermediate_size=512)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")


@pytest.fixture(scope="module")
def checkpoints(checkpoint_pair):
    return checkpoint_pair(CONFIG, seed=4, group_size=16)


@pytest.fixture(scope="module")
def inputs():
    ids = np.random.default_rng(0).integers(0, REAL, (8, 12))
    prompts = [ids[i, : 3 + i].tolist() for i in range(8)]  # ragged, 8 rows so every batch split applies
    return ids, prompts


@pytest.fixture(scope="module")
def references(checkpoints, inputs):
    ids, prompts = inputs
    refs = {}
    for kind, path in checkpoints.items():
        model, _ = qwen_jax.load(path, dtype="float32")
        refs[kind] = (np.asarray(model.logits(ids)), _greedy(model, prompts))
    return refs


def _greedy(model, prompts):
    gen = GenerationConfig.resolve({}, do_sample=False, max_new_tokens=6, repetition_penalty=1.0)
    return [g.tokens for g in list(generate_tokens(model, prompts, gen))[-1]]


@pytest.mark.parametrize("kind", ["float", "gptq"])
@pytest.mark.parametrize("strategy", sorted(sharding.STRATEGIES))
def test_strategy_matches_single_device(checkpoints, inputs, references, kind, strategy):
    ids, prompts = inputs
    want_logits, want_tokens = references[kind]
    for data, model_axis in MESHES if kind == "float" else MESHES[1:3]:
        mesh = sharding.make_mesh({"data": data, "model": model_axis})
        model, _ = qwen_jax.load(checkpoints[kind], dtype="float32", mesh=mesh, strategy=strategy)
        got = np.asarray(model.logits(ids))
        assert rel_err(got[..., :REAL], want_logits[..., :REAL]) <= 1e-4, (data, model_axis)
        assert _greedy(model, prompts) == want_tokens, (data, model_axis)


def test_load_without_mesh_uses_all_devices(checkpoints):
    model, _ = qwen_jax.load(checkpoints["float"], dtype="float32", strategy="tp")
    assert dict(model.mesh.shape) == {"data": 1, "model": 8}
    kernel = model.params["layers"]["mlp"]["w1w2"]["kernel"]  # [layers, embed, 2, mlp], mlp split 8 ways
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 128, 2, 32)}


def test_tp_splits_int8_weights_evenly(checkpoints):
    model, _ = qwen_jax.load(checkpoints["gptq"], dtype="float32", strategy="tp")
    int8_layers = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(model.params["layers"])
                   if path[-1].key in ("qvalue", "scales")]
    per_device = sharding_lab.bytes_per_device(int8_layers)
    total = sum(per_device)
    assert len(per_device) == 8
    assert max(per_device) == min(per_device) == total // 8  # each device holds exactly 1/8 of the int8 layers


def test_tp_decode_step_collectives(checkpoints):
    """Megatron TP: 2 all-reduces per layer for the activations, none to gather weights (read from compiled HLO,
    loop bodies counted once per layer)."""
    counts = {}
    for layers in (2, 4):
        config = CONFIG.replace(num_hidden_layers=layers)
        path = testing.write_float_checkpoint(checkpoints["float"].parent / f"layers{layers}", config, seed=1)
        model, _ = qwen_jax.load(path, dtype="bfloat16", strategy="tp")
        found = sharding_lab.report(model, "tp", batch=1, kv_len=32, steps=1).collectives
        counts[layers] = found
        weight_bytes = 128 * 128 * 2 // 8  # the smallest per-device weight shard (attn.c_proj), bf16
        gathers = found.get("all-gather", (0, 0))
        assert gathers[1] < weight_bytes, f"weights gathered: {found}"
    assert counts[4]["all-reduce"][0] - counts[2]["all-reduce"][0] == 2 * 2, counts


def test_inapplicable_strategy_fails_before_loading(checkpoints):
    config = CONFIG.replace(num_attention_heads=4, kv_channels=32)
    with pytest.raises(sharding.ShardingError, match=r"layers/attn/c_attn/.*'heads' has size 4.*8 devices"):
        sharding.check(abstract_params(config, jnp.float32), sharding.make_mesh({"data": 1, "model": 8}), "tp")
    with pytest.raises(sharding.ShardingError, match=r"mesh axis 'expert' is unknown"):
        qwen_jax.load(checkpoints["float"], mesh=sharding.make_mesh({"expert": 8}), strategy="tp")
    with pytest.raises(sharding.ShardingError, match="unknown strategy 'zigzag'"):
        qwen_jax.load(checkpoints["float"], strategy="zigzag")


def test_sweep_table(checkpoints):
    reports = sharding_lab.sweep(checkpoints["float"], ["replicated", "tp"], [(1, 8)], batch=8, kv_len=32)
    replicated, tp = reports
    assert max(tp.param_bytes) < max(replicated.param_bytes) / 4
    assert "all-reduce" in tp.collectives and not replicated.collectives
    table = sharding_lab.format_table(reports)
    assert "| tp " in table and "step ms" in table
