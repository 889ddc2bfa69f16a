"""Writers of small random Qwen checkpoints in exactly the published on-disk format.

Tests, benchmarks and the embedded demo share these. The files are what `Qwen/Qwen-*-Chat` ships: safetensors
shards `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, `config.json`,
`generation_config.json` and `qwen.tiktoken` (a copy of the real vocabulary), tensors named
`transformer.h.{i}.attn.c_attn.weight` etc. in PyTorch's [out, in] layout, float16 as in the released files.
GPTQ Int8 checkpoints are what `Qwen/Qwen-*-Chat-Int8` ships: the same float tensors, and per quantized linear
`qweight`/`qzeros`/`scales`/`g_idx`/`bias` (AutoGPTQ v1) with `quantize_config.json` and config.json's
`quantization_config`.
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
    ordinary = min(151643, v)  # test configs may have a smaller vocabulary
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


# --- GPTQ Int8 (AutoGPTQ v1, as Qwen-*-Chat-Int8 ships it: QWEN_SPEC §2) -------------------------------------------

# Uniform q - 128 over [-128, 127] has a standard deviation of about 74: scales of U(0.5, 1.5) / (74 sqrt(K)) give
# weights of about 1 / sqrt(K), like the float fixture, so activations stay O(1) through any depth.
_Q_STD = 74.0


def gptq_quantize_config(group_size: int, desc_act: bool = False) -> dict:
    """quantize_config.json as AutoGPTQ wrote it for Qwen-*-Chat-Int8 (no checkpoint_format key: v1)."""
    return {"bits": 8, "group_size": group_size, "damp_percent": 0.01, "desc_act": desc_act, "static_groups": False,
            "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model"}


def _gptq_values(seed: int, name: str, k: int, n: int, group: int, desc_act: bool):
    """Makers of one linear's random q (uint8 [K, N]), scales (float16 [K/g, N]) and g_idx (int32 [K])."""

    def q():
        return _rng(seed, f"{name}.qweight").integers(0, 256, (k, n), dtype=np.uint8)

    def scales():
        spread = _rng(seed, f"{name}.scales").uniform(0.5, 1.5, (k // group, n))
        return (spread / (_Q_STD * k ** 0.5)).astype(np.float16)

    def g_idx():
        if not desc_act:
            return (np.arange(k) // group).astype(np.int32)
        # Act-order as GPTQ does it: rows are quantized in a permuted order and grouped in that order.
        order = _rng(seed, f"{name}.g_idx").permutation(k)
        groups = np.empty(k, np.int32)
        groups[order] = np.arange(k) // group
        return groups

    return q, scales, g_idx


def pack_rows(q: np.ndarray) -> np.ndarray:
    """uint8 [K, N] -> int32 [K/4, N]: row 4r + j in bits [8j, 8j + 8) of word r (AutoGPTQ's qweight packing)."""
    k, n = q.shape
    shifts = (8 * np.arange(4, dtype=np.uint32))[None, :, None]
    words = np.bitwise_or.reduce(q.reshape(k // 4, 4, n).astype(np.uint32) << shifts, axis=1)
    return words.view(np.int32)


def _gptq_linear_specs(seed: int, name: str, k: int, n: int, group: int, desc_act: bool) -> list[TensorSpec]:
    q, scales, g_idx = _gptq_values(seed, name, k, n, group, desc_act)
    # Stored zero minus one, four per word along N: 127 everywhere for symmetric 8-bit.
    zeros = np.full((k // group, n // 4), 0x7F7F7F7F, np.uint32).view(np.int32)
    return [(f"{name}.qweight", (k // 4, n), np.dtype(np.int32), lambda: pack_rows(q())),
            (f"{name}.qzeros", zeros.shape, np.dtype(np.int32), lambda: zeros),
            (f"{name}.scales", (k // group, n), np.dtype(np.float16), scales),
            (f"{name}.g_idx", (k,), np.dtype(np.int32), g_idx)]


def _check_group(config: QwenConfig, group_size: int) -> None:
    ks = (config.hidden_size, config.mlp_width)
    if group_size % 4 or any(k % group_size for k in ks):
        raise ValueError(f"group_size {group_size} must be a multiple of 4 dividing every K {ks}")


def gptq_tensor_specs(config: QwenConfig, seed: int, group_size: int, desc_act: bool = False,
                      zero_bias: bool = True) -> list[TensorSpec]:
    """(name, shape, dtype, make) of every tensor of a GPTQ Int8 checkpoint, in the published order.

    The float tensors (embeddings, norms, c_attn bias, lm_head) are the float fixture's; `zero_bias` adds the
    all-zero biases that 2023-era AutoGPTQ wrote for every bias-free linear.
    """
    _check_group(config, group_size)
    floats = {spec[0]: spec for spec in float_tensor_specs(config, seed)}
    linears = layout.float_linear_names(config)
    specs = [floats["transformer.wte.weight"]]
    for i in range(config.num_hidden_layers):
        pre = layout.layer_prefix(i)
        specs.append(floats[f"{pre}.ln_1.weight"])
        for part in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"):
            if part == "mlp.w1":
                specs.append(floats[f"{pre}.ln_2.weight"])
            name = f"{pre}.{part}"
            n, k = linears[name]
            specs += _gptq_linear_specs(seed, name, k, n, group_size, desc_act)
            if part == "attn.c_attn":
                specs.append(floats[f"{name}.bias"])
            elif zero_bias:
                specs.append((f"{name}.bias", (n,), np.dtype(np.float16), lambda n=n: np.zeros(n, np.float16)))
    specs += [floats["transformer.ln_f.weight"], floats["lm_head.weight"]]
    return specs


def write_gptq_checkpoint(directory: str | Path, config: QwenConfig, seed: int = 0, group_size: int = 128,
                          desc_act: bool = False, zero_bias: bool = True, num_shards: int = 2) -> Path:
    """A random GPTQ Int8 checkpoint of `config` in the published layout (Qwen-*-Chat-Int8), streamed to disk."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_sharded(directory, gptq_tensor_specs(config, seed, group_size, desc_act, zero_bias), num_shards)
    quantize_config = gptq_quantize_config(group_size, desc_act)
    write_metadata(directory, config, {"quantization_config": {**quantize_config, "quant_method": "gptq"}})
    (directory / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2))
    return directory


def gptq_dequantized_tensors(config: QwenConfig, seed: int = 0, group_size: int = 128,
                             desc_act: bool = False) -> dict[str, np.ndarray]:
    """What `write_gptq_checkpoint` means, in memory, under the names of a float checkpoint (for oracles): the float
    tensors as written, and each linear's `{name}.weight` [out, in] float32 = scales[g_idx[k], n] * (q[k, n] - 128).
    """
    _check_group(config, group_size)
    tensors = {name: make() for name, _, _, make in float_tensor_specs(config, seed)
               if name not in {f"{linear}.weight" for linear in layout.float_linear_names(config)}}
    for name, (n, k) in layout.float_linear_names(config).items():
        q, scales, g_idx = (make() for make in _gptq_values(seed, name, k, n, group_size, desc_act))
        weight = scales.astype(np.float32)[g_idx] * (q.astype(np.float32) - 128)  # [K, N], exact in float32
        tensors[f"{name}.weight"] = weight.T
    return tensors


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
