"""Every strategy (and a custom rules table) on 8 simulated CPU devices gives the single-device LoRA loss and
gradients, float and int8 bases; factors are placed by the same rules as the weights they adapt."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import qwen_jax
from qwen_jax import sharding
from qwen_jax.finetune import data, lora, train
from qwen_jax.finetune.objective import IGNORE
from tests.test_sharding import CONFIG as SHARDING_CONFIG

# The sharding tests' model with a smaller vocabulary (divisible by 8): compiling the 8-device gradient is the cost.
CONFIG = SHARDING_CONFIG.replace(vocab_size=4096)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")

LORA = lora.LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=("c_attn", "c_proj", "w1", "w2", "lm_head"))
CUSTOM = (("batch", "data"), ("mlp", "model"), ("lora_rank", "model"))  # the rank axis split too


@pytest.fixture(scope="module")
def checkpoints(checkpoint_pair):
    return checkpoint_pair(CONFIG, seed=4, group_size=16)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size, (8, 16)).astype(np.int32)
    labels = np.where(rng.random((8, 16)) < 0.3, IGNORE, ids).astype(np.int32)
    return data.Batch(ids, labels, np.full(8, 16))


def _factors(trainer):
    """Random factors (b = 0 would zero every a-gradient), the same on every mesh."""
    rng = np.random.default_rng(9)
    host = jax.tree_util.tree_map(lambda box: (0.2 * rng.standard_normal(box.value.shape)).astype(np.float32),
                                  trainer.specs, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return trainer.place(host)


def _loss_and_grads(path, mesh, strategy, batch):
    model, _ = qwen_jax.load(path, dtype="float32", mesh=mesh, strategy=strategy)
    trainer = train.Trainer(model, train.TrainConfig(lora=LORA), total_steps=1)
    grads, (loss, _) = trainer.grads(_factors(trainer), batch)
    return float(loss), jax.device_get(grads), trainer


@pytest.fixture(scope="module")
def references(checkpoints, batch):
    one = sharding.make_mesh({"data": 1, "model": 1}, jax.devices()[:1])
    return {kind: _loss_and_grads(path, one, "replicated", batch)[:2] for kind, path in checkpoints.items()}


# "replicated" is left out: on any mesh it runs the single-device program on every device. The int8 base runs under
# the 2-D strategy, whose rules split it both ways.
CASES = [("float", s) for s in ("dp", "tp", "fsdp", "fsdp_tp")] + [("float", CUSTOM), ("gptq", "dp_tp")]


@pytest.mark.parametrize("kind,strategy", CASES, ids=[f"{k}-{s if isinstance(s, str) else 'custom'}" for k, s in CASES])
def test_strategy_gives_single_device_loss_and_grads(checkpoints, batch, references, kind, strategy):
    mesh = sharding.make_mesh({"data": 2, "model": 4})
    loss, grads, trainer = _loss_and_grads(checkpoints[kind], mesh, strategy, batch)
    want_loss, want_grads = references[kind]
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)  # float32: reduction order only
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        want = want_grads
        for key in path:
            want = want[key.key]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), jax.tree_util.keystr(path)
    # each factor placed by the rules of the weight it adapts
    factors = trainer.place(jax.tree_util.tree_map(np.zeros_like, grads))
    a = factors["layers"]["attn"]["c_attn"]["a"]  # [L, embed, r]
    b = factors["layers"]["mlp"]["w1w2"]["w1"]["b"]  # [L, r, mlp]
    shard = lambda x: x.addressable_shards[0].data.shape  # noqa: E731
    expected = {"fsdp": ((2, 128 // 8, 8), (2, 8, 256)), "tp": ((2, 128, 8), (2, 8, 256 // 8)),
                "fsdp_tp": ((2, 128 // 2, 8), (2, 8, 256 // 4)), "custom": ((2, 128, 8 // 4), (2, 8, 256 // 4))}  # b: `model` already splits mlp
    name = strategy if isinstance(strategy, str) else "custom"
    if name in expected:
        assert (shard(a), shard(b)) == expected[name]


def test_training_report_fsdp(checkpoints):
    """sharding_lab's training step report: fsdp splits the base 8 ways and the factors and optimizer moments on
    their embed axes (the compiled step gathers the weights)."""
    from qwen_jax import sharding_lab

    config = train.TrainConfig(lora=LORA, batch_size=8, max_len=16)
    model, _ = qwen_jax.load(checkpoints["float"], dtype="float32", strategy="fsdp")
    report = sharding_lab.training_report(model, "fsdp", config, steps=1)
    whole_params = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
    specs = lora.factor_specs(CONFIG, lora.select(CONFIG, LORA), LORA.r)
    whole_factors = sum(4 * np.prod(box.value.shape) for box in jax.tree_util.tree_leaves(
        specs, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
    assert len(report.param_bytes) == 8 and max(report.param_bytes) <= whole_params / 8 + 4096  # all but the c_attn bias have embed
    assert max(report.factor_bytes) < whole_factors  # a's of embed-input linears and b's of embed outputs split
    assert max(report.optimizer_bytes) < 3 * whole_factors  # two moments and the accumulator, split alike
    assert report.temp_bytes > 0 and "all-gather" in report.collectives
    assert "| fsdp " in sharding_lab.format_table([report])
