"""A float64 NumPy forward of Qwen v1 written from the formulas of QWEN_SPEC §1, NTK and logn included.

Independent of qwen_jax's code: it reads the checkpoint tensors by their published names and layout.
"""

from __future__ import annotations

import math

import numpy as np

from qwen_jax.config import QwenConfig


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def forward(config: QwenConfig, tensors: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """ids [B, S] -> logits [B, S, vocab] (float64), no padding mask; NTK alpha from the sequence length."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    b, s = ids.shape
    d, h, hd = config.hidden_size, config.num_attention_heads, config.head_dim
    base = config.rotary_emb_base
    if config.use_dynamic_ntk:
        alpha = max(2 ** math.ceil(math.log(s / config.seq_length, 2) + 1) - 1, 1)
        base = base * alpha ** (hd / (hd - 2))
    inv_freq = 1.0 / base ** (np.arange(0, hd, 2) / hd)
    angle = np.arange(s)[:, None] * inv_freq[None]
    angle = np.concatenate([angle, angle], -1)  # [S, hd]
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    logn = np.array([math.log(p + 1, config.seq_length) if p + 1 > config.seq_length else 1.0 for p in range(s)])
    causal = np.tril(np.ones((s, s), bool))

    x = t["transformer.wte.weight"][ids]
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}"
        n = _rms(x, t[f"{p}.ln_1.weight"], config.layer_norm_epsilon)
        qkv = n @ t[f"{p}.attn.c_attn.weight"].T + t[f"{p}.attn.c_attn.bias"]
        q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(b, s, h, hd) for j in range(3))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if config.use_logn_attn:
            q = q * logn[None, :, None, None]
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d)
        x = x + attn @ t[f"{p}.attn.c_proj.weight"].T
        n = _rms(x, t[f"{p}.ln_2.weight"], config.layer_norm_epsilon)
        up, gate = n @ t[f"{p}.mlp.w1.weight"].T, n @ t[f"{p}.mlp.w2.weight"].T
        x = x + (up * gate / (1 + np.exp(-gate))) @ t[f"{p}.mlp.c_proj.weight"].T
    x = _rms(x, t["transformer.ln_f.weight"], config.layer_norm_epsilon)
    return x @ t["lm_head.weight"].T


def attention(q, k, v, mask):
    """float64 softmax attention, one (row, query, head) at a time: q [B, S, H, D], k/v [B, H, T, D] (the KV cache's
    layout), mask [B, S, T] bool -> [B, S, H, D]."""
    out = np.zeros(q.shape)
    for b, s, h in np.ndindex(*q.shape[:3]):
        scores = np.where(mask[b, s], k[b, h] @ q[b, s, h] / np.sqrt(q.shape[-1]), -np.inf)  # [T]
        probs = np.exp(scores - scores.max())
        out[b, s, h] = probs @ v[b, h] / probs.sum()
    return out
