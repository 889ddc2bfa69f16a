"""`qwen_jax.load`: a checkpoint directory -> (model on its devices, tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from qwen_jax import sharding as sharding_lib
from qwen_jax.checkpoint import load_params
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
         strategy: str = "replicated") -> tuple[QwenModel, QwenTokenizer]:
    """Load a Qwen (v1) checkpoint directory (HF float safetensors) and its tokenizer.

    Tensors stream one at a time from memory-mapped shards straight onto the devices of `mesh` (default: the
    first local device), placed by the rules of `strategy`. Activations and float weights use `dtype`.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = QwenConfig.from_json(directory)
    dtype = resolve_dtype(dtype)
    if mesh is None:
        mesh = sharding_lib.make_mesh({"model": 1}, jax.devices()[:1])
    try:
        rules = sharding_lib.STRATEGIES[strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r}; known: {sorted(sharding_lib.STRATEGIES)}") from None
    tokenizer = QwenTokenizer.from_dir(directory)
    params = load_params(directory, config, dtype, mesh, rules)
    model = QwenModel(config, params, dtype, generation_config=read_generation_config(directory))
    return model, tokenizer
