"""A float model (an adapter merged in, or any) written back as a checkpoint in the published HF layout: safetensors
with `transformer.h.{i}.attn.c_attn.weight` [out, in] etc., config.json, generation_config.json and qwen.tiktoken,
readable by `qwen_jax.load` and by anything that reads Qwen-*-Chat directories."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from qwen_jax import testing
from qwen_jax.checkpoint.layout import layer_prefix
from qwen_jax.model import QwenModel

_NUMPY_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32),
                 "float16": np.dtype(np.float16)}


def _tensor_specs(model: QwenModel) -> list[testing.TensorSpec]:
    """(name, shape, dtype, make) of every tensor, in the published order; each made (fetched) when written."""
    c, p = model.config, model.params
    d, heads, hd = c.hidden_size, c.num_attention_heads, c.head_dim
    dtype = _NUMPY_DTYPES[np.dtype(model.dtype).name]

    def spec(name, fetch):
        shape = jax.eval_shape(fetch).shape
        return name, tuple(shape), dtype, lambda: np.asarray(jax.device_get(fetch()), dtype)

    layers = p["layers"]
    specs = [spec("transformer.wte.weight", lambda: p["wte"]["embedding"])]
    for i in range(c.num_hidden_layers):
        pre = layer_prefix(i)
        specs += [
            spec(f"{pre}.ln_1.weight", lambda i=i: layers["ln_1"]["weight"][i]),
            spec(f"{pre}.attn.c_attn.weight",
                 lambda i=i: layers["attn"]["c_attn"]["kernel"][i].reshape(d, 3 * heads * hd).T),
            spec(f"{pre}.attn.c_attn.bias", lambda i=i: layers["attn"]["c_attn"]["bias"][i].reshape(3 * d)),
            spec(f"{pre}.attn.c_proj.weight", lambda i=i: layers["attn"]["c_proj"]["kernel"][i].T),
            spec(f"{pre}.ln_2.weight", lambda i=i: layers["ln_2"]["weight"][i]),
            spec(f"{pre}.mlp.w1.weight", lambda i=i: layers["mlp"]["w1w2"]["kernel"][i, :, 0].T),
            spec(f"{pre}.mlp.w2.weight", lambda i=i: layers["mlp"]["w1w2"]["kernel"][i, :, 1].T),
            spec(f"{pre}.mlp.c_proj.weight", lambda i=i: layers["mlp"]["c_proj"]["kernel"][i].T),
        ]
    specs += [spec("transformer.ln_f.weight", lambda: p["ln_f"]["weight"]),
              spec("lm_head.weight", lambda: p["lm_head"]["kernel"].T)]
    return specs


def save_checkpoint(model: QwenModel, directory: str | Path, num_shards: int = 2) -> Path:
    """Write `model` (float weights, adapters merged) as an HF-layout checkpoint, atomically."""
    if model.quant_group is not None:
        raise ValueError("an int8 model cannot be saved as a float checkpoint: merge an adapter into a float base "
                         "(load it with a float checkpoint) to save the result")
    if model.host_embedding is not None:
        raise ValueError("save the model before moving its embedding table to the host")
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    testing.write_sharded(staging, _tensor_specs(model), num_shards)
    name = np.dtype(model.dtype).name
    testing.write_metadata(staging, model.config, {"torch_dtype": name, "bf16": name == "bfloat16",
                                                   "fp16": name == "float16", "fp32": name == "float32"})
    if model.generation_config:
        (staging / "generation_config.json").write_text(json.dumps(model.generation_config, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)
    return directory
