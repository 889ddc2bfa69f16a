"""From checkpoint tensors to our parameter layout, lazily.

Each parameter is described by a *lazy array*: anything with `.shape`, `.dtype` and `__getitem__(slices)` that
returns a NumPy array of just that slice. Transposes and reshapes are NumPy views of the memory-mapped source,
so the loader can ask for the slice a device owns and only those bytes are read. Parameters are keyed per layer
(`h_{i}/attn/c_attn/kernel`), as checkpoints store them; qwen_jax.checkpoint.pieces stacks them for the model.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from qwen_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from qwen_jax.config import QwenConfig

ParamPath = tuple[str, ...]
FLOAT_DTYPES = (np.float16, np.float32, "bfloat16")


class LazyArray(Protocol):
    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray: ...


class Stacked:
    """Lazy `np.stack(parts, axis)`: reads only the parts and slices that an index selects."""

    def __init__(self, parts: Sequence[LazyArray], axis: int):
        self.parts, self.axis = list(parts), axis
        shape = list(parts[0].shape)
        shape.insert(axis, len(parts))
        self.shape, self.dtype = tuple(shape), parts[0].dtype

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        rest = index[: self.axis] + index[self.axis + 1:]
        chosen = range(len(self.parts))[index[self.axis]]
        return np.stack([np.asarray(self.parts[i][rest]) for i in chosen], axis=self.axis)


class MappedOnRead:
    """Lazy `tensor.reshape(shape)` of one checkpoint tensor that maps its file only while a slice is read.

    A memory map per tensor held for the whole load would keep one file descriptor open per tensor (over 1000 for a
    72B GPTQ checkpoint, the usual limit) and keep every page read so far counted in the process's RSS.
    """

    def __init__(self, ckpt: SafetensorsCheckpoint, name: str, stored_shape: tuple[int, ...], dtypes: tuple,
                 shape: tuple[int, ...] | None = None):
        stored = ckpt.get(name, stored_shape, dtypes)  # validates now; the map is dropped on return
        self.ckpt, self.name, self.dtype = ckpt, name, stored.dtype
        self.shape = tuple(shape or stored_shape)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return np.array(self.ckpt.get(self.name).reshape(self.shape)[index])


def layer_prefix(i: int) -> str:
    return f"transformer.h.{i}"


def float_linear_names(config: QwenConfig) -> dict[str, tuple[int, int]]:
    """Checkpoint names of every per-layer float weight -> its PyTorch shape [out, in]."""
    d, f = config.hidden_size, config.mlp_width
    shapes = {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.w1": (f, d), "mlp.w2": (f, d), "mlp.c_proj": (d, f)}
    return {f"{layer_prefix(i)}.{k}": v for i in range(config.num_hidden_layers) for k, v in shapes.items()}


def shared_sources(ckpt: SafetensorsCheckpoint, config: QwenConfig) -> dict[ParamPath, LazyArray]:
    """Parameters stored the same way in float and GPTQ checkpoints: embeddings, norms, lm_head, c_attn bias."""
    d, v = config.hidden_size, config.vocab_size
    heads, hd = config.num_attention_heads, config.head_dim
    sources: dict[ParamPath, LazyArray] = {
        ("wte", "embedding"): ckpt.get("transformer.wte.weight", (v, d), FLOAT_DTYPES),
        ("ln_f", "weight"): ckpt.get("transformer.ln_f.weight", (d,), FLOAT_DTYPES),
        ("lm_head", "kernel"): ckpt.get("lm_head.weight", (v, d), FLOAT_DTYPES).T,
    }
    for i in range(config.num_hidden_layers):
        pre, layer = layer_prefix(i), f"h_{i}"
        sources[(layer, "ln_1", "weight")] = ckpt.get(f"{pre}.ln_1.weight", (d,), FLOAT_DTYPES)
        sources[(layer, "ln_2", "weight")] = ckpt.get(f"{pre}.ln_2.weight", (d,), FLOAT_DTYPES)
        bias = ckpt.get(f"{pre}.attn.c_attn.bias", (3 * d,), FLOAT_DTYPES)
        sources[(layer, "attn", "c_attn", "bias")] = bias.reshape(3, heads, hd)
    return sources


def float_sources(ckpt: SafetensorsCheckpoint, config: QwenConfig) -> dict[ParamPath, LazyArray]:
    """Every parameter of a float checkpoint; linear weights [out, in] become kernels [in, *out]."""
    heads, hd, d = config.num_attention_heads, config.head_dim, config.hidden_size
    shapes = float_linear_names(config)
    w = {name: ckpt.get(f"{name}.weight", shape, FLOAT_DTYPES) for name, shape in shapes.items()}
    sources = shared_sources(ckpt, config)
    for i in range(config.num_hidden_layers):
        pre, layer = layer_prefix(i), f"h_{i}"
        # [3*d, d] -> [d, 3, heads, head_dim]: a view, so slicing it reads only the selected bytes.
        sources[(layer, "attn", "c_attn", "kernel")] = w[f"{pre}.attn.c_attn"].reshape(3, heads, hd, d).transpose(3, 0, 1, 2)
        sources[(layer, "attn", "c_proj", "kernel")] = w[f"{pre}.attn.c_proj"].T
        sources[(layer, "mlp", "w1w2", "kernel")] = Stacked([w[f"{pre}.mlp.w1"].T, w[f"{pre}.mlp.w2"].T], axis=1)
        sources[(layer, "mlp", "c_proj", "kernel")] = w[f"{pre}.mlp.c_proj"].T
    return sources


def expected_float_tensors(config: QwenConfig) -> set[str]:
    names = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(config.num_hidden_layers):
        pre = layer_prefix(i)
        names |= {f"{pre}.ln_1.weight", f"{pre}.ln_2.weight", f"{pre}.attn.c_attn.bias"}
    return names | {f"{n}.weight" for n in float_linear_names(config)}
