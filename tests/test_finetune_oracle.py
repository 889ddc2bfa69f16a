"""LoRA loss and gradients against HF peft's LoRA on transformers' Qwen2 holding the same weights (float32, CPU),
on a float base and on the GPTQ int8 base (Q-LoRA: peft on the dequantized weights), with per-layer remat."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

import qwen_jax
from qwen_jax.finetune import lora, objective
from tests.peft_oracle import peft_qwen2, qwen2_grads

R, ALPHA = 4, 8.0


def _factors(config, mesh):
    """Random a and b (peft starts b at 0, which would leave every a-gradient 0 and test nothing)."""
    specs = lora.factor_specs(config, lora.select(config, lora.LoraConfig(r=R, alpha=ALPHA)), R)
    factors = lora.init(0, specs, mesh, ())
    rng = np.random.default_rng(3)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if p[-1].key == "a" else (0.2 * rng.standard_normal(x.shape)).astype(np.float32), factors)


def _batch():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 151643, (2, 13)).astype(np.int32)
    labels = ids.copy()
    labels[0, :5] = objective.IGNORE  # a prompt
    labels[1, 9:] = objective.IGNORE  # padding
    return ids, labels


@pytest.mark.parametrize("kind", ["float", "gptq"])
def test_loss_and_lora_grads_match_peft(kind, tiny_dir, tiny_gptq_dir, tiny_config, tiny_tensors,
                                        tiny_gptq_tensors):
    from tests.oracle import qwen2_from_tensors

    path, tensors = (tiny_dir, tiny_tensors) if kind == "float" else (tiny_gptq_dir, tiny_gptq_tensors)
    model, _ = qwen_jax.load(path, dtype="float32")
    factors = _factors(tiny_config, model.mesh)
    ids, labels = _batch()
    module = dataclasses.replace(model.module, remat=True)
    # Differentiated w.r.t. the base too: its linears are frozen (zero gradients), the rest is not.
    (loss, _), (grads, base_grads) = jax.value_and_grad(objective.loss, argnums=(0, 1), has_aux=True, allow_int=True)(
        factors, model.params, ids, labels, module=module, scale=ALPHA / R)
    frozen = base_grads["layers"]["mlp"]["c_proj"]["scales" if kind == "gptq" else "kernel"]
    assert not np.any(np.asarray(frozen, np.float32))
    assert np.any(np.asarray(base_grads["layers"]["ln_1"]["weight"]))

    reference = peft_qwen2(qwen2_from_tensors(tiny_config, tensors), jax.device_get(factors), R, ALPHA,
                           tiny_config.num_hidden_layers)
    out = reference(input_ids=torch.from_numpy(ids.astype(np.int64)), labels=torch.from_numpy(labels.astype(np.int64)))
    out.loss.backward()
    want = qwen2_grads(reference, tiny_config.num_hidden_layers, R)

    # float32 end to end: summation order only (~1e-6 relative); 1e-4 as for the logits.
    assert abs(float(loss) - out.loss.item()) <= 1e-4 * abs(out.loss.item())
    g = jax.device_get(grads)["layers"]
    got = {"c_attn": g["attn"]["c_attn"], "c_proj": g["attn"]["c_proj"], "w1": g["mlp"]["w1w2"]["w1"],
           "w2": g["mlp"]["w1w2"]["w2"], "mlp_c_proj": g["mlp"]["c_proj"]}
    got["c_attn"] = {"a": got["c_attn"]["a"], "b": got["c_attn"]["b"].reshape(want["c_attn"]["b"].shape)}
    for name in want:
        for factor in ("a", "b"):
            w, o = want[name][factor], got[name][factor]
            assert o.shape == w.shape, (name, factor)
            err = np.abs(o - w).max() / np.abs(w).max()
            assert err <= 1e-4, (name, factor, err)
