"""Adapter files against HF peft: a peft-saved adapter for Qwen v1 gives peft's logits in qwen_jax (merged into a
float base, kept separate on the int8 base), ours loads in peft with the same logits; merged models save and load."""

import json

import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file, save_file

import qwen_jax
from qwen_jax.finetune import adapters, lora, merged
from tests.oracle import qwen2_from_tensors, qwen2_logits, rel_err
from tests.peft_oracle import QwenV1, logits

REAL = 151851
TARGETS = ["c_attn", "c_proj", "w1", "w2"]


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(8).integers(0, REAL, (2, 11))


def _randomize(model, seed):
    """Nonzero lora_B (peft starts it at zero, which would make every adapter a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))


def test_qwen_v1_oracle_matches_qwen2(tiny_config, tiny_tensors, hf_tiny, ids):
    """The PyTorch module tree with Qwen v1 names computes transformers' Qwen2 function (so peft on it is a reference)."""
    assert rel_err(logits(QwenV1(tiny_config, tiny_tensors), ids), qwen2_logits(hf_tiny, ids)) <= 1e-5


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_config, tiny_tensors):
    reference = peft.get_peft_model(QwenV1(tiny_config, tiny_tensors),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    _randomize(reference, 0)
    directory = tmp_path_factory.mktemp("peft-adapter")
    reference.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", ["float", "gptq"])
def test_peft_adapter_gives_peft_logits(kind, peft_adapter, tiny_dir, tiny_gptq_dir, tiny_config, tiny_tensors,
                                        tiny_gptq_tensors, ids):
    path, tensors = (tiny_dir, tiny_tensors) if kind == "float" else (tiny_gptq_dir, tiny_gptq_tensors)
    reference = peft.PeftModel.from_pretrained(QwenV1(tiny_config, tensors), peft_adapter)
    want = logits(reference.get_base_model(), ids)  # the module tree with peft's LoRA layers in place
    model, _ = qwen_jax.load(path, dtype="float32", adapter=peft_adapter)
    int8_kept = "qvalue" in model.params["layers"]["attn"]["c_attn"]
    assert int8_kept == (kind == "gptq")
    assert ("lora" in model.params["layers"]["attn"]["c_attn"]) == (kind == "gptq")  # merged into float weights
    got = np.asarray(model.logits(ids))[..., :REAL]
    assert rel_err(got, want[..., :REAL]) <= 1e-4  # float32 throughout
    base, _ = qwen_jax.load(path, dtype="float32")
    assert rel_err(np.asarray(base.logits(ids))[..., :REAL], want[..., :REAL]) > 1e-2  # the adapter matters


def test_our_adapter_loads_in_peft_and_merged_model_saves(tmp_path, tiny_dir, tiny_config, tiny_tensors, ids):
    config = lora.LoraConfig(r=4, alpha=16, dropout=0.05, target_modules=("c_attn", "c_proj", "w1", "w2", "lm_head"))
    targets = lora.select(tiny_config, config)
    specs = lora.factor_specs(tiny_config, targets, config.r)
    rng = np.random.default_rng(2)
    factors = {}
    for t in targets:
        node = specs
        for name in t.key:
            node = node[name]
        lora.put(factors, t.key, {f: (0.3 * rng.standard_normal(node[f].value.shape)).astype(np.float32) for f in "ab"})
    adapters.save(tmp_path / "ours", factors, tiny_config, config, base_model=str(tiny_dir))
    saved = json.loads((tmp_path / "ours" / adapters.CONFIG_FILE).read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 16 and saved["target_modules"] == list(config.target_modules)
    names = load_file(str(tmp_path / "ours" / adapters.WEIGHTS_FILE))
    assert names["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"].shape == (3 * 64, 4)
    assert names["base_model.model.transformer.h.0.mlp.w2.lora_A.weight"].shape == (4, 64)

    reference = peft.PeftModel.from_pretrained(QwenV1(tiny_config, tiny_tensors), tmp_path / "ours")
    want = logits(reference.get_base_model(), ids)[..., :REAL]
    model, _ = qwen_jax.load(tiny_dir, dtype="float32", adapter=tmp_path / "ours")
    assert rel_err(np.asarray(model.logits(ids))[..., :REAL], want) <= 1e-4

    merged.save_checkpoint(model, tmp_path / "merged")
    reloaded, _ = qwen_jax.load(tmp_path / "merged", dtype="float32")
    assert rel_err(np.asarray(reloaded.logits(ids))[..., :REAL], want) <= 1e-4
    # and transformers reads the merged checkpoint's tensors as the same function
    hf = qwen2_from_tensors(tiny_config, load_file(str(tmp_path / "merged" / "model-00001-of-00002.safetensors"))
                            | load_file(str(tmp_path / "merged" / "model-00002-of-00002.safetensors")))
    assert rel_err(qwen2_logits(hf, ids)[..., :REAL], want) <= 1e-4


def test_bad_adapters_are_refused_before_loading(tmp_path, peft_adapter, tiny_dir):
    def variant(name, edit_config=None, edit_tensors=None):
        directory = tmp_path / name
        directory.mkdir()
        raw = json.loads((peft_adapter / adapters.CONFIG_FILE).read_text())
        tensors = load_file(str(peft_adapter / adapters.WEIGHTS_FILE))
        (directory / adapters.CONFIG_FILE).write_text(json.dumps(edit_config(raw) if edit_config else raw))
        save_file(edit_tensors(tensors) if edit_tensors else tensors, str(directory / adapters.WEIGHTS_FILE))
        return directory

    key = "base_model.model.transformer.h.1.mlp.w1.lora_B.weight"
    cases = [
        (variant("dora", lambda c: c | {"use_dora": True}), "use_dora=True is not supported"),
        (variant("rank", lambda c: c | {"r": 8}), r"h\.0\.attn\.c_attn\.lora_A\.weight has shape \[4, 64\], expected \[8, 64\]"),
        (variant("missing", edit_tensors=lambda t: {k: v for k, v in t.items() if k != key}), f"missing {key}"),
        (variant("subset", lambda c: c | {"target_modules": "transformer\\.h\\.0\\..*"}), "in only 1 of 2 layers"),
        (variant("wte", lambda c: c | {"target_modules": ["wte"]}), "'wte' matches no linear"),
    ]
    for directory, message in cases:
        with pytest.raises(adapters.AdapterError, match=message):
            qwen_jax.load(tiny_dir, dtype="float32", adapter=directory)
