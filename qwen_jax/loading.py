"""`qwen_jax.load`: a checkpoint directory -> (model on its devices, tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from qwen_jax import sharding as sharding_lib
from qwen_jax.checkpoint import load_params, orbax_io
from qwen_jax.checkpoint.safetensors_io import CheckpointError
from qwen_jax.config import QwenConfig
from qwen_jax.model import QwenModel, check_embedding_on_host
from qwen_jax.tokenizer import QwenTokenizer

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def read_generation_config(directory: Path) -> dict:
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def resolve_kv_dtype(kv_dtype, dtype) -> jnp.dtype:
    """The KV cache's dtype: None = the model's `dtype`; "int8" = the quantized cache; else a float dtype."""
    if kv_dtype is None:
        return jnp.dtype(dtype)
    if kv_dtype == "int8" or not isinstance(kv_dtype, str) and jnp.dtype(kv_dtype) == jnp.int8:
        return jnp.dtype(jnp.int8)
    if isinstance(kv_dtype, str) and kv_dtype not in DTYPES:
        raise ValueError(f"kv_dtype {kv_dtype!r} not supported; use 'int8' or one of {sorted(DTYPES)}")
    return resolve_dtype(kv_dtype)


def load(path: str | Path, dtype="bfloat16", mesh: jax.sharding.Mesh | None = None,
         strategy: str | sharding_lib.Rules = "replicated", kv_dtype=None,
         embedding_on_host: bool = False, adapter: str | Path | None = None) -> tuple[QwenModel, QwenTokenizer]:
    """Load a Qwen (v1) checkpoint directory and its tokenizer.

    `path` is an HF directory of float safetensors shards, a GPTQ Int8 one as published (Qwen-*-Chat-Int8: kept
    int8 on the devices, converted tensor by tensor on the fly), or the output of `python -m convert` (the
    fastest to load). Tensors stream one at a time straight onto the devices of `mesh` (default: every local
    device, laid out as `sharding.default_mesh(strategy)`), placed by the rules of `strategy` (a name of
    `sharding.STRATEGIES` or a rules table), which is checked against the model before a weight is read.
    Activations and float weights use `dtype`; the KV cache `kv_dtype` (default `dtype`; "int8" halves the
    cache's memory against bfloat16: one float16 scale per token and head). `embedding_on_host` keeps the token
    embedding table in host memory (one device only; 2.3 GiB of device memory for Qwen-72B). `adapter`: a PEFT
    LoRA adapter directory (qwen_jax.finetune.adapters), merged into float weights, kept separate on an int8 base.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    # A converted directory is checked file by file before anything in it is trusted, config.json included.
    marker = orbax_io.read_marker(directory) if orbax_io.is_converted(directory) else None
    config = QwenConfig.from_json(directory)
    dtype = resolve_dtype(dtype)
    kv_dtype = resolve_kv_dtype(kv_dtype, dtype)
    rules = sharding_lib.get_rules(strategy)
    if mesh is None:
        mesh = sharding_lib.default_mesh(strategy)
    if embedding_on_host:
        check_embedding_on_host(mesh)  # before a weight is read
    tokenizer = QwenTokenizer.from_dir(directory)
    if adapter is not None:  # checked against the model before a weight is read
        from qwen_jax.finetune import adapters

        adapter = adapters.load(adapter, config)
    if marker is not None:
        quant_group = marker["quant_group"]
        params = orbax_io.restore_params(directory, config, dtype, mesh, strategy, marker)
    else:
        params, quant_group = load_params(directory, config, dtype, mesh, strategy)
    model = QwenModel(config, params, dtype, quant_group=quant_group,
                      generation_config=read_generation_config(directory), mesh=mesh, rules=rules,
                      kv_dtype=kv_dtype)
    if adapter is not None:
        model = adapters.apply(model, *adapter)
    if embedding_on_host:
        model = model.with_embedding_on_host()
    return model, tokenizer
