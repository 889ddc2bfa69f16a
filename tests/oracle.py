"""Independent references: transformers' Qwen2 (same math as Qwen v1 with mapped weights, QWEN_SPEC §1)."""

from __future__ import annotations

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
