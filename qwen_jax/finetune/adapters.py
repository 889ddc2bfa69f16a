"""LoRA adapters as PEFT writes and reads them: `adapter_config.json` + `adapter_model.safetensors`.

Tensors are named after Qwen v1's modules, `base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight` [r, in]
and `….lora_B.weight` [out, in→r] in PyTorch's layout (metadata format=pt); lora_B is unscaled (scale = alpha / r,
or alpha / sqrt(r) with use_rslora). The config carries the keys peft 0.7 reads. Reading accepts what peft writes
for Qwen v1 (any later version's extra keys) and refuses with a clear error the features this engine does not
apply (DoRA, per-module rank or alpha, modules_to_save, trained biases, a subset of layers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from qwen_jax import sharding as sharding_lib
from qwen_jax.config import QwenConfig
from qwen_jax.finetune import lora
from qwen_jax.model import QwenModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter directory that cannot be applied to this model (the file and what is wrong)."""


def peft_config(lora_config: lora.LoraConfig, base_model: str | None = None) -> dict:
    targets = lora_config.target_modules
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": lora_config.r, "lora_alpha": lora_config.alpha, "lora_dropout": lora_config.dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": lora_config.use_rslora,
    }


def to_tensors(factors: dict, config: QwenConfig, targets: list[lora.Target]) -> dict[str, np.ndarray]:
    """PEFT's state dict of the factors: per layer and module, lora_A [r, K] and lora_B [prod(out), r] float32."""
    host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), factors)
    tensors = {}
    for t in targets:
        f = host
        for name in t.key:
            f = f[name]
        layers = range(config.num_hidden_layers) if t.stacked else [None]
        for i in layers:
            a, b = (f["a"], f["b"]) if i is None else (f["a"][i], f["b"][i])
            module = PREFIX + t.module.format(i=i)
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)
    return tensors


def save(directory: str | Path, factors: dict, config: QwenConfig, lora_config: lora.LoraConfig,
         base_model: str | None = None) -> Path:
    """Write the adapter's two files into `directory`, each atomically (written aside, then renamed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    targets = lora.select(config, lora_config)
    weights = directory / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    save_file(to_tensors(factors, config, targets), str(weights), metadata={"format": "pt"})
    os.replace(weights, directory / WEIGHTS_FILE)
    settings = directory / f".{CONFIG_FILE}.{os.getpid()}.tmp"
    settings.write_text(json.dumps(peft_config(lora_config, base_model), indent=2))
    os.replace(settings, directory / CONFIG_FILE)
    return directory


def read_config(directory: Path) -> lora.LoraConfig:
    path = directory / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: cannot read the adapter config ({e})") from None
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {raw.get('peft_type')!r}, only 'LORA' adapters are supported")
    refused = {"use_dora": bool, "rank_pattern": bool, "alpha_pattern": bool, "modules_to_save": bool,
               "layers_to_transform": lambda v: v is not None, "bias": lambda v: v not in (None, "none"),
               "fan_in_fan_out": bool, "lora_bias": bool, "exclude_modules": bool, "layer_replication": bool,
               "trainable_token_indices": bool, "target_parameters": bool, "use_qalora": bool}
    for key, is_used in refused.items():
        if key in raw and is_used(raw[key]):
            raise AdapterError(f"{path}: {key}={raw[key]!r} is not supported by qwen_jax adapters")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise AdapterError(f"{path}: missing key {key!r}")
    targets = raw["target_modules"]
    return lora.LoraConfig(r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)),
                           target_modules=targets if isinstance(targets, str) else tuple(targets),
                           use_rslora=bool(raw.get("use_rslora", False)))


def load(directory: str | Path, config: QwenConfig) -> tuple[lora.LoraConfig, dict]:
    """(config, factors as host float32 arrays in our layout) of a PEFT LoRA adapter for Qwen v1, checked against
    the model: every targeted module present with the right shapes, nothing else."""
    directory = Path(directory)
    lora_config = read_config(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{path}: not found (adapter_model.bin, PyTorch's pickle, is not read: save with "
                           "safe_serialization)")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        targets = lora.select(config, lora_config)
    except ValueError as e:
        raise AdapterError(f"{directory / CONFIG_FILE}: {e}") from None
    by_module = {}
    for name, array in tensors.items():
        match = _KEY.match(name)
        if match is None:
            raise AdapterError(f"{path}: unexpected tensor {name!r} (a LoRA adapter holds lora_A/lora_B weights)")
        by_module[(match["module"], match["factor"])] = array.astype(np.float32)
    factors: dict = {}
    used = set()
    for t in targets:
        k, out = t.shapes(config)
        n_out = int(np.prod(out))
        layers = range(config.num_hidden_layers) if t.stacked else [None]
        a_list, b_list = [], []
        for i in layers:
            module = t.module.format(i=i)
            for factor, want in (("A", (lora_config.r, k)), ("B", (n_out, lora_config.r))):
                if (module, factor) not in by_module:
                    raise AdapterError(f"{path}: missing {PREFIX}{module}.lora_{factor}.weight")
                got = by_module[(module, factor)].shape
                if got != want:
                    raise AdapterError(f"{path}: {PREFIX}{module}.lora_{factor}.weight has shape {list(got)}, "
                                       f"expected {list(want)}")
                used.add((module, factor))
            a_list.append(by_module[(module, "A")].T)
            b_list.append(by_module[(module, "B")].T.reshape(lora_config.r, *out))
        a, b = (np.stack(a_list), np.stack(b_list)) if t.stacked else (a_list[0], b_list[0])
        lora.put(factors, t.key, {"a": a, "b": b})
    extra = sorted(set(by_module) - used)
    if extra:
        raise AdapterError(f"{path}: tensors for modules not in target_modules, e.g. {extra[0][0]}")
    return lora_config, factors


def apply(model: QwenModel, lora_config: lora.LoraConfig, host_factors: dict) -> QwenModel:
    """`model` serving an adapter (as `load` returns it): merged into float weights, kept separate on an int8 base
    (its factors placed by the model's rules, like training places them)."""
    mesh = model.mesh or sharding_lib.make_mesh({"data": 1, "model": 1}, jax.devices()[:1])
    specs = lora.factor_specs(model.config, lora.select(model.config, lora_config), lora_config.r)
    factors = jax.tree_util.tree_map(jax.device_put, host_factors, lora.shardings(specs, mesh, model.rules))
    if model.quant_group is None:
        params = lora.merge(model.params, factors, lora_config.scale)
    else:
        params = lora.attach(model.params, factors, lora_config.scale)
    return dataclasses.replace(model, params=params)
