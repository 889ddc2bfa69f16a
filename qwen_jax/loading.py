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
from qwen_jax.model import QwenModel
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


def load(path: str | Path, dtype="bfloat16", mesh: jax.sharding.Mesh | None = None,
         strategy: str | sharding_lib.Rules = "replicated") -> tuple[QwenModel, QwenTokenizer]:
    """Load a Qwen (v1) checkpoint directory and its tokenizer.

    `path` is an HF directory of float safetensors shards, a GPTQ Int8 one as published (Qwen-*-Chat-Int8: kept
    int8 on the devices, converted tensor by tensor on the fly), or the output of `python -m convert` (the
    fastest to load). Tensors stream one at a time straight onto the devices of `mesh` (default: every local
    device, laid out as `sharding.default_mesh(strategy)`), placed by the rules of `strategy` (a name of
    `sharding.STRATEGIES` or a rules table), which is checked against the model before a weight is read.
    Activations and float weights use `dtype`.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    # A converted directory is checked file by file before anything in it is trusted, config.json included.
    marker = orbax_io.read_marker(directory) if orbax_io.is_converted(directory) else None
    config = QwenConfig.from_json(directory)
    dtype = resolve_dtype(dtype)
    rules = sharding_lib.get_rules(strategy)
    if mesh is None:
        mesh = sharding_lib.default_mesh(strategy)
    tokenizer = QwenTokenizer.from_dir(directory)
    if marker is not None:
        quant_group = marker["quant_group"]
        params = orbax_io.restore_params(directory, config, dtype, mesh, strategy, marker)
    else:
        params, quant_group = load_params(directory, config, dtype, mesh, strategy)
    model = QwenModel(config, params, dtype, quant_group=quant_group,
                      generation_config=read_generation_config(directory), mesh=mesh, rules=rules)
    return model, tokenizer
