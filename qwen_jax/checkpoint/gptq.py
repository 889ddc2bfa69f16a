"""Read GPTQ Int8 checkpoints (AutoGPTQ "v1" format, as Qwen-*-Chat-Int8 ships them) into the int8 device layout.

Per quantized linear with K inputs and N outputs (QWEN_SPEC §2):
  qweight int32   [K/4, N]    four 8-bit values per word along K, least significant byte first
  qzeros  int32   [K/g, N/4]  zero point minus one, four per word along N (127 everywhere for symmetric 8-bit)
  scales  float16 [K/g, N]
  g_idx   int32   [K]         group of each input row
  bias    float16 [N]         real for c_attn; 2023-era AutoGPTQ also wrote all-zero biases for the others
and W[k, n] = scales[g_idx[k], n] * (q[k, n] - zero). The device layout (qwen_jax.quant) keeps q - 128 as int8 and
the scales as stored, so a checkpoint is accepted only when that is exact: zero 128 everywhere and g_idx = k // g.

Act-order (desc_act) checkpoints are rejected. Their groups are scattered along K; making them contiguous means
permuting the rows of W and, identically, the input features x of that linear. No permutation of the residual
stream or of the attention heads can do that for c_attn, attn.c_proj and w1/w2, so it would need a gather in the
model, or per-row scales (a float16 scale per weight: 3x the memory of the int8 values). Qwen's releases use
desc_act false, so we refuse the others plainly instead of loading them slowly or wrongly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_jax.checkpoint import layout
from qwen_jax.checkpoint.layout import LazyArray, MappedOnRead, ParamPath, Stacked
from qwen_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsCheckpoint
from qwen_jax.config import QwenConfig

QUANTIZE_CONFIG = "quantize_config.json"
PACK = 4  # 8-bit values per int32 word
SYM_ZEROS_WORD = 0x7F7F7F7F  # four stored zeros of 127 (= 128 - 1), the only zero point we accept
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")

# quantize_config keys that record how the quantization was run or how to run it, not how tensors are stored.
_PROVENANCE_KEYS = {
    "damp_percent", "true_sequential", "static_groups", "model_name_or_path", "model_file_base_name", "meta",
    "quant_method", "tokenizer", "dataset", "use_cuda_fp16", "model_seqlen", "block_name_to_quantize",
    "module_name_preceding_first_block", "modules_in_block_to_quantize", "batch_size", "pad_token_id",
    "use_exllama", "disable_exllama", "exllama_config", "max_input_length", "cache_block_outputs", "backend",
}
# Keys that change the stored format: each must have the value we read (None = may be absent).
_FORMAT_KEYS = {"bits", "group_size", "sym", "desc_act", "checkpoint_format", "is_marlin_format", "lm_head",
                "dynamic", "pack_dtype"}


@dataclass(frozen=True)
class GptqConfig:
    group_size: int
    desc_act: bool
    source: str = field(compare=False)  # the file it was read from, for error messages


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def _check_quantize_config(raw: dict, source: str, config: QwenConfig) -> GptqConfig:
    unknown = sorted(set(raw) - _PROVENANCE_KEYS - _FORMAT_KEYS)
    if unknown:
        raise CheckpointError(f"{source}: unknown quantization keys {unknown}: cannot tell how they change the stored "
                              f"tensors, so the checkpoint is not loaded")
    if raw.get("quant_method", "gptq") != "gptq":
        raise CheckpointError(f"{source}: quant_method {raw['quant_method']!r} is not supported (only 'gptq')")
    fmt = raw.get("checkpoint_format", "gptq")
    if fmt == "gptq_v2":
        raise CheckpointError(f"{source}: checkpoint_format 'gptq_v2' (GPTQModel, zero points stored without the "
                              f"v1 offset of one) is not supported; only AutoGPTQ v1 ('gptq' or absent) is")
    if fmt != "gptq":
        raise CheckpointError(f"{source}: unknown checkpoint_format {fmt!r}; only AutoGPTQ v1 ('gptq' or absent) "
                              f"is supported")
    if raw.get("bits") != 8:
        raise CheckpointError(f"{source}: bits is {raw.get('bits')!r}; only 8-bit GPTQ is supported")
    if raw.get("sym") is not True:
        raise CheckpointError(f"{source}: sym is {raw.get('sym')!r}; only symmetric GPTQ (sym true, zero point 128) "
                              f"is supported: asymmetric zeros do not fit the int8 device layout exactly")
    for key, allowed in (("is_marlin_format", (False,)), ("lm_head", (False,)), ("dynamic", ({},)),
                         ("pack_dtype", ("int32",))):
        if key in raw and raw[key] not in allowed + (None,):
            raise CheckpointError(f"{source}: {key} {raw[key]!r} is not supported (expected {allowed[0]!r} or absent)")
    g = raw.get("group_size")
    ks = {"hidden_size": config.hidden_size, "mlp width (intermediate_size / 2)": config.mlp_width}
    if not isinstance(g, int) or g <= 0 or g % PACK or any(k % g for k in ks.values()):
        raise CheckpointError(f"{source}: group_size {g!r} is not supported: it must be a positive multiple of {PACK} "
                              f"dividing every input dimension {ks} (-1, one group per row, is not supported)")
    desc_act = raw.get("desc_act", False)
    if not isinstance(desc_act, bool):
        raise CheckpointError(f"{source}: desc_act must be true or false, got {desc_act!r}")
    return GptqConfig(group_size=g, desc_act=desc_act, source=source)


def read_gptq_config(directory: str | Path, config: QwenConfig) -> GptqConfig | None:
    """The checked GPTQ settings of a checkpoint directory, or None for a float checkpoint.

    Read from quantize_config.json (AutoGPTQ) and/or config.json["quantization_config"] (transformers); when both
    exist they must agree on every key that changes the stored tensors.
    """
    directory = Path(directory)
    found = {}
    if (directory / QUANTIZE_CONFIG).is_file():
        found[str(directory / QUANTIZE_CONFIG)] = _read_json(directory / QUANTIZE_CONFIG)
    if (directory / "config.json").is_file():
        embedded = _read_json(directory / "config.json").get("quantization_config")
        if embedded is not None:
            if not isinstance(embedded, dict):
                raise CheckpointError(f"{directory / 'config.json'}: quantization_config must be an object")
            found[f"{directory / 'config.json'} (quantization_config)"] = embedded
    checked = [_check_quantize_config(raw, source, config) for source, raw in found.items()]
    if len(checked) == 2 and checked[0] != checked[1]:
        a, b = checked
        raise CheckpointError(f"{a.source} and {b.source} disagree: group_size {a.group_size} vs {b.group_size}, "
                              f"desc_act {a.desc_act} vs {b.desc_act}")
    return checked[0] if checked else None


# --- tensors ------------------------------------------------------------------------------------------------------


def linear_shapes(config: QwenConfig) -> dict[str, tuple[int, int]]:
    """Checkpoint prefix of every quantized linear -> (K inputs, N outputs)."""
    return {name: (k, n) for name, (n, k) in layout.float_linear_names(config).items()}


def expected_tensors(config: QwenConfig) -> tuple[set[str], set[str]]:
    """(required, optional) tensor names of a GPTQ checkpoint; optional = the zero biases of bias-free linears."""
    required = layout.expected_float_tensors(config) - {f"{n}.weight" for n in layout.float_linear_names(config)}
    optional = set()
    for name in linear_shapes(config):
        required |= {f"{name}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx")}
        if not name.endswith("attn.c_attn"):
            optional.add(f"{name}.bias")
    return required, optional


class Int8FromPacked:
    """Lazy int8 values q - 128 [K, *N] from a packed `qweight` [K/4, *N] lazy array.

    A slice reads only the packed rows that hold its K range. The bytes of the stored little-endian words are the
    values in K order (byte j of row r is input row 4r + j), so unpacking is a byte view, not shifts; q - 128 in
    two's complement is q with its top bit flipped.
    """

    def __init__(self, packed: LazyArray):
        self.packed = packed
        self.shape = (packed.shape[0] * PACK, *packed.shape[1:])
        self.dtype = np.dtype(np.int8)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        start, stop, step = index[0].indices(self.shape[0])
        if step != 1:
            raise ValueError(f"strided K slices are not supported, got {index[0]}")
        r0, r1 = start // PACK, -(-stop // PACK)
        words = np.ascontiguousarray(self.packed[(slice(r0, r1),) + index[1:]])  # [rows, *n]
        values = words.view(np.uint8).reshape(*words.shape, PACK)  # [rows, *n, 4]: the file's byte order
        values = np.moveaxis(values, -1, 1).reshape(PACK * words.shape[0], *words.shape[1:])  # [4 * rows, *n]
        values = values[start - PACK * r0: stop - PACK * r0]
        return (values ^ np.uint8(0x80)).view(np.int8)


def gptq_sources(ckpt: SafetensorsCheckpoint, config: QwenConfig, group: int) -> dict[ParamPath, LazyArray]:
    """Every parameter of a GPTQ checkpoint, per layer, in the int8 device layout, lazily (shapes and dtypes
    checked now)."""
    heads, hd = config.num_attention_heads, config.head_dim
    shapes = linear_shapes(config)
    sources = layout.shared_sources(ckpt, config)
    for i in range(config.num_hidden_layers):
        pre, layer = layout.layer_prefix(i), f"h_{i}"
        qvalue, scales = {}, {}
        for part in LINEARS:
            k, n = shapes[f"{pre}.{part}"]
            # c_attn's N = [q | k | v], each head-major: [3, heads, head_dim] as in the float layout.
            n_shape = (3, heads, hd) if part == "attn.c_attn" else (n,)
            name = f"{pre}.{part}"
            packed = MappedOnRead(ckpt, f"{name}.qweight", (k // PACK, n), (np.int32,), (k // PACK, *n_shape))
            qvalue[part] = Int8FromPacked(packed)
            scales[part] = MappedOnRead(ckpt, f"{name}.scales", (k // group, n), (np.float16,), (k // group, *n_shape))
        for module, part in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_proj")):
            sources[(layer, module, part, "qvalue")] = qvalue[f"{module}.{part}"]
            sources[(layer, module, part, "scales")] = scales[f"{module}.{part}"]
        sources[(layer, "mlp", "w1w2", "qvalue")] = Stacked([qvalue["mlp.w1"], qvalue["mlp.w2"]], axis=1)
        sources[(layer, "mlp", "w1w2", "scales")] = Stacked([scales["mlp.w1"], scales["mlp.w2"]], axis=1)
    return sources


def check_values(ckpt: SafetensorsCheckpoint, config: QwenConfig, group: int) -> None:
    """Check what the layout drops or assumes, tensor by tensor: zero points 128, g_idx = k // g (no act-order),
    biases of bias-free linears zero, scales finite. Reads about 2% of the checkpoint (zeros, scales, g_idx)."""
    for name, (k, n) in linear_shapes(config).items():
        zeros = ckpt.get(f"{name}.qzeros", (k // group, n // PACK), (np.int32,))
        bad = np.argwhere(zeros.view(np.uint32) != SYM_ZEROS_WORD)
        if len(bad):
            g, c = bad[0]
            stored = zeros[g:g + 1, c:c + 1].view(np.uint8).ravel()
            raise CheckpointError(
                f"{ckpt.info(name + '.qzeros').file}: tensor {name}.qzeros: zero points {[int(z) + 1 for z in stored]} "
                f"at group {g}, columns {PACK * c}..{PACK * c + PACK - 1} (stored minus one); symmetric 8-bit GPTQ v1 "
                f"has zero 128 everywhere (every word 0x7F7F7F7F), and no other zero fits the int8 layout exactly")
        g_idx = ckpt.get(f"{name}.g_idx", (k,), (np.int32,))
        contiguous = np.arange(k, dtype=np.int32) // group
        if not np.array_equal(g_idx, contiguous):
            row = int(np.argmax(g_idx != contiguous))
            raise CheckpointError(
                f"{ckpt.info(name + '.g_idx').file}: tensor {name}.g_idx: input row {row} is in group {g_idx[row]}, "
                f"not {row // group} = row // group_size: act-order (desc_act) checkpoints are not supported "
                f"(their groups are not contiguous along K; see qwen_jax.checkpoint.gptq). Use a desc_act=false "
                f"or static_groups=true quantization")
        scales = ckpt.get(f"{name}.scales", (k // group, n), (np.float16,))
        bad = np.argwhere(~np.isfinite(scales))
        if len(bad):
            raise CheckpointError(f"{ckpt.info(name + '.scales').file}: tensor {name}.scales: non-finite scale "
                                  f"{scales[tuple(bad[0])]} at [group, column] {bad[0].tolist()} "
                                  f"({len(bad)} non-finite in all)")
        if f"{name}.bias" in ckpt and not name.endswith("attn.c_attn"):
            bias = ckpt.get(f"{name}.bias", (n,), layout.FLOAT_DTYPES)
            if np.any(bias != 0):
                raise CheckpointError(f"{ckpt.info(name + '.bias').file}: tensor {name}.bias is not all zeros; Qwen v1 "
                                      f"has no bias on this linear, so it cannot be dropped safely")
