"""Independent references: transformers' Qwen2 (same math as Qwen v1 with mapped weights, QWEN_SPEC §1) and
AutoGPTQ 0.7.1's dequantizer (the GPTQ v1 format, QWEN_SPEC §2)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwen_jax.config import QwenConfig


def qwen2_from_tensors(config: QwenConfig, tensors: dict[str, np.ndarray]) -> Qwen2ForCausalLM:
    """A float32 Qwen2ForCausalLM holding the Qwen v1 checkpoint tensors `tensors` (HF names, [out, in])."""
    hf_config = Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.mlp_width,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, max_position_embeddings=config.seq_length,
        rope_parameters={"rope_type": "default", "rope_theta": config.rotary_emb_base},
        rms_norm_eps=config.layer_norm_epsilon, tie_word_embeddings=False, use_sliding_window=False,
        attention_dropout=0.0,
    )
    hf_config._attn_implementation = "eager"
    d = config.hidden_size
    t = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()}
    state = {
        "model.embed_tokens.weight": t["transformer.wte.weight"],
        "model.norm.weight": t["transformer.ln_f.weight"],
        "lm_head.weight": t["lm_head.weight"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer.h.{i}", f"model.layers.{i}"
        w, b = t[f"{src}.attn.c_attn.weight"], t[f"{src}.attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{dst}.self_attn.{name}.weight"] = w[j * d:(j + 1) * d]
            state[f"{dst}.self_attn.{name}.bias"] = b[j * d:(j + 1) * d]
        state[f"{dst}.self_attn.o_proj.weight"] = t[f"{src}.attn.c_proj.weight"]
        state[f"{dst}.mlp.up_proj.weight"] = t[f"{src}.mlp.w1.weight"]
        state[f"{dst}.mlp.gate_proj.weight"] = t[f"{src}.mlp.w2.weight"]
        state[f"{dst}.mlp.down_proj.weight"] = t[f"{src}.mlp.c_proj.weight"]
        state[f"{dst}.input_layernorm.weight"] = t[f"{src}.ln_1.weight"]
        state[f"{dst}.post_attention_layernorm.weight"] = t[f"{src}.ln_2.weight"]
    model = Qwen2ForCausalLM(hf_config).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def qwen2_logits(model: Qwen2ForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: the issue's measure of logits agreement."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# --- AutoGPTQ 0.7.1, the third-party reference for the GPTQ v1 format ------------------------------------------------
#
# We load one file of AutoGPTQ 0.7.1, auto_gptq/nn_modules/qlinear/qlinear_cuda.py, by path: its QuantLinear
# dequantizes on the CPU (g_idx included, QWEN_SPEC §2) and imports only torch, transformers and numpy (its CUDA
# extensions are optional imports). It comes from the PyPI wheel: `pip download` of the sdist runs setup.py, which
# needs CUDA to build, while a wheel is only downloaded. The platform flags fetch the same wheel from any host; we
# keep the one file (checked by hash) in a cache, never in this repository.

AUTOGPTQ_WHEEL = "auto-gptq==0.7.1"
AUTOGPTQ_PLATFORM = ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                     "--platform", "manylinux2014_x86_64"]
QLINEAR_CUDA = "auto_gptq/nn_modules/qlinear/qlinear_cuda.py"
QLINEAR_CUDA_SHA256 = "5a6a483784adc7d9ee55e62f6dc4fdaf3a642f56796d2a6b8afea0b2364d751d"


class OracleUnavailable(RuntimeError):
    pass


def oracle_cache() -> Path:
    default = Path(os.environ.get("QWEN_JAX_CACHE", Path.home() / ".cache" / "qwen_jax")) / "oracles"
    return Path(os.environ.get("QWEN_JAX_ORACLE_CACHE", default))


def autogptq_qlinear_file() -> Path:
    """AutoGPTQ 0.7.1's qlinear_cuda.py in the cache, downloading the wheel with pip the first time."""
    target = oracle_cache() / "auto_gptq-0.7.1" / "qlinear_cuda.py"
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == QLINEAR_CUDA_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", AUTOGPTQ_WHEEL, "--no-deps", "--only-binary", ":all:",
               *AUTOGPTQ_PLATFORM, "--dest", tmp]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise OracleUnavailable(f"{' '.join(cmd)}: {e}") from None
        wheels = list(Path(tmp).glob("auto_gptq-0.7.1-*.whl"))
        if result.returncode or not wheels:
            raise OracleUnavailable(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            source = wheel.read(QLINEAR_CUDA)
    digest = hashlib.sha256(source).hexdigest()
    if digest != QLINEAR_CUDA_SHA256:
        raise OracleUnavailable(f"{QLINEAR_CUDA} from {wheels[0].name}: sha256 {digest}, expected {QLINEAR_CUDA_SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    partial.write_bytes(source)
    os.replace(partial, target)
    return target


def autogptq_quant_linear() -> type:
    """AutoGPTQ 0.7.1's `QuantLinear` class (qlinear_cuda.py), loaded by file path."""
    path = autogptq_qlinear_file()
    spec = importlib.util.spec_from_file_location("autogptq_0_7_1_qlinear_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.QuantLinear


def autogptq_dequantize(quant_linear: type, tensors: dict[str, np.ndarray], group_size: int) -> np.ndarray:
    """W [K, N] float32 of one GPTQ linear (`tensors`: its qweight, qzeros, scales, g_idx), as AutoGPTQ computes it.

    Its CPU path forms W = scales[g_idx] * (q - zero) and returns x @ W; with x = I and float32 scales (exact
    widenings of the float16 ones) every product is exact, so this is W itself.
    """
    k, n = tensors["g_idx"].shape[0], tensors["scales"].shape[1]
    layer = quant_linear(bits=8, group_size=group_size, infeatures=k, outfeatures=n, bias=False,
                         weight_dtype=torch.float32)
    layer.qweight = torch.from_numpy(np.array(tensors["qweight"]))
    layer.qzeros = torch.from_numpy(np.array(tensors["qzeros"]))
    layer.scales = torch.from_numpy(np.array(tensors["scales"], np.float32))
    layer.g_idx = torch.from_numpy(np.array(tensors["g_idx"]))
    with torch.no_grad():
        return layer(torch.eye(k, dtype=torch.float32)).numpy()
