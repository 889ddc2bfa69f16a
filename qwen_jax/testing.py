"""Writers of small random Qwen checkpoints in exactly the published on-disk format.

Tests, benchmarks and the embedded demo share these. The files are what `Qwen/Qwen-*-Chat` ships: safetensors
shards `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, `config.json`,
`generation_config.json` and `qwen.tiktoken` (a copy of the real vocabulary), tensors named
`transformer.h.{i}.attn.c_attn.weight` etc. in PyTorch's [out, in] layout, float16 as in the released files.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from qwen_jax.checkpoint import layout
from qwen_jax.checkpoint.safetensors_io import INDEX_FILE
from qwen_jax.config import QwenConfig, preset
from qwen_jax.tokenizer import default_vocab_file

_SAFETENSORS_DTYPE = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
                      np.dtype(np.int32): "I32", np.dtype(np.int8): "I8"}

# Family values of Qwen-*-Chat generation_config.json (QWEN_SPEC §4).
GENERATION_CONFIG = {
    "chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
    "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
    "transformers_version": "4.31.0",
}

TensorSpec = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def _rng(seed: int, name: str) -> np.random.Generator:
    # Each tensor's values depend on (seed, name) only, not on the order or the sharding of the files.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def float_tensor_specs(config: QwenConfig, seed: int, dtype=np.float16) -> list[TensorSpec]:
    """(name, shape, dtype, make) for every tensor of a float checkpoint, in the published order.

    Scales keep activations O(1) through any depth: linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1),
    norm weights near 1, so logits are O(1) and their top-1 is not a near-tie everywhere.
    """
    d, v = config.hidden_size, config.vocab_size
    dtype = np.dtype(dtype)

    def normal(name, shape, std, mean=0.0):
        return name, shape, dtype, lambda: (mean + std * _rng(seed, name).standard_normal(shape, np.float32)).astype(dtype)

    specs = [normal("transformer.wte.weight", (v, d), 1.0)]
    linears = layout.float_linear_names(config)
    for i in range(config.num_hidden_layers):
        pre = layout.layer_prefix(i)
        specs.append(normal(f"{pre}.ln_1.weight", (d,), 0.1, 1.0))
        for part in ("attn.c_attn", "attn.c_proj"):
            shape = linears[f"{pre}.{part}"]
            specs.append(normal(f"{pre}.{part}.weight", shape, shape[1] ** -0.5))
        specs.append(normal(f"{pre}.attn.c_attn.bias", (3 * d,), 0.1))
        specs.append(normal(f"{pre}.ln_2.weight", (d,), 0.1, 1.0))
        for part in ("mlp.w1", "mlp.w2", "mlp.c_proj"):
            shape = linears[f"{pre}.{part}"]
            specs.append(normal(f"{pre}.{part}.weight", shape, shape[1] ** -0.5))
    specs.append(normal("transformer.ln_f.weight", (d,), 0.1, 1.0))
    specs.append(("lm_head.weight", (v, d), dtype, lambda: _bigram_lm_head(specs[0][3](), seed).astype(dtype)))
    return specs


def _bigram_lm_head(wte: np.ndarray, seed: int, strength: float = 4.0) -> np.ndarray:
    """lm_head of a noisy bigram model: row π(t) leans towards the embedding of token t.

    A purely random model spreads its probability over 152k tokens (top-1 probability ~1e-3), so top-1 flips
    on any rounding; trained models are confident. Aligning row π(t) with wte[t] makes "t is followed by π(t)"
    likely (~87% of greedy picks at this strength, median top-1 probability ~0.9), while context decides the rest.
    π permutes the ordinary tokens only, so special and padding rows stay plain noise.
    """
    v, d = wte.shape
    rng = _rng(seed, "lm_head.weight")
    head = rng.standard_normal((v, d), np.float32) * d ** -0.5
    ordinary = 151643
    head[rng.permutation(ordinary)] += strength * d ** -0.5 * wte[:ordinary].astype(np.float32)
    return head


def write_safetensors(path: Path, specs: Iterable[TensorSpec]) -> None:
    """Stream tensors into one safetensors file: the header first (from shapes), then each tensor as made."""
    specs = list(specs)
    header, offset = {}, 0
    for name, shape, dtype, _ in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPE[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, make in specs:
            array = np.ascontiguousarray(make(), dtype=dtype)
            if array.shape != tuple(shape):
                raise AssertionError(f"{name}: made {array.shape}, declared {shape}")
            f.write(array.tobytes())


def write_sharded(directory: Path, specs: list[TensorSpec], num_shards: int) -> None:
    """Split `specs` into `num_shards` files of about equal size, with the HF index json."""
    sizes = [int(np.prod(s, dtype=np.int64)) * np.dtype(dt).itemsize for _, s, dt, _ in specs]
    total, bounds, acc = sum(sizes), [0], 0
    for i, size in enumerate(sizes):
        acc += size
        if acc >= total * len(bounds) / num_shards and len(bounds) < num_shards:
            bounds.append(i + 1)
    bounds.append(len(specs))
    if num_shards == 1:
        write_safetensors(directory / "model.safetensors", specs)
        return
    weight_map = {}
    for k in range(num_shards):
        shard = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        part = specs[bounds[k]: bounds[k + 1]]
        write_safetensors(directory / shard, part)
        weight_map.update({name: shard for name, *_ in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))


def write_metadata(directory: Path, config: QwenConfig, extra_config: dict | None = None) -> None:
    (directory / "config.json").write_text(json.dumps({**config.to_dict(), **(extra_config or {})}, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    shutil.copyfile(default_vocab_file(), directory / "qwen.tiktoken")


def write_float_checkpoint(directory: str | Path, config: QwenConfig, seed: int = 0, num_shards: int = 2,
                           dtype=np.float16) -> Path:
    """A random float checkpoint of `config` in the published layout (HF Qwen-*-Chat)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_sharded(directory, float_tensor_specs(config, seed, dtype), num_shards)
    write_metadata(directory, config)
    return directory


def float_tensors(config: QwenConfig, seed: int = 0, dtype=np.float16) -> dict[str, np.ndarray]:
    """The tensors `write_float_checkpoint` writes, in memory (for oracles in tests)."""
    return {name: make() for name, _, _, make in float_tensor_specs(config, seed, dtype)}


def default_checkpoint_dir() -> Path:
    """The embedded default model: a tiny random checkpoint written on first use (its text is gibberish)."""
    cache = Path(os.environ.get("QWEN_JAX_CACHE", Path.home() / ".cache" / "qwen_jax"))
    directory = cache / "tiny-random-v1"
    if not (directory / "config.json").is_file():
        staging = cache / f".tiny-random-v1.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        write_float_checkpoint(staging, preset("tiny"), seed=0)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
    return directory
