"""HF peft as the reference for LoRA: on transformers' Qwen2 (gradients), and on a PyTorch module tree with Qwen v1's
module names (adapter files: peft matches modules by name, so an adapter for Qwen v1 needs those names).

`QwenV1` is written from QWEN_SPEC §1 in PyTorch, float32; tests check its logits against transformers' Qwen2
before trusting it.
"""

from __future__ import annotations

import numpy as np
import peft
import torch
from torch import nn

from qwen_jax.config import QwenConfig

QWEN2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]


class _RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Attention(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        d = c.hidden_size
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d, bias=False)
        self.heads, self.hd, self.base = c.num_attention_heads, c.head_dim, c.rotary_emb_base

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.c_attn(x).view(b, s, 3, self.heads, self.hd).unbind(2)  # [b, s, h, hd]
        inv = self.base ** (-torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd)
        angle = torch.arange(s, dtype=torch.float32)[:, None] * inv[None]
        cos, sin = torch.cat([angle, angle], -1).cos()[:, None], torch.cat([angle, angle], -1).sin()[:, None]

        def rope(t):
            half = self.hd // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

        q, k, v = rope(q).transpose(1, 2), rope(k).transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / self.hd ** 0.5
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        return self.c_proj(out)


class _MLP(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        d, f = c.hidden_size, c.mlp_width
        self.w1, self.w2, self.c_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.c_proj(self.w1(x) * nn.functional.silu(self.w2(x)))  # w2 is the gate


class _Block(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        self.ln_1, self.attn = _RMSNorm(c.hidden_size, c.layer_norm_epsilon), _Attention(c)
        self.ln_2, self.mlp = _RMSNorm(c.hidden_size, c.layer_norm_epsilon), _MLP(c)

    def forward(self, x):
        h = x + self.attn(self.ln_1(x))
        return h + self.mlp(self.ln_2(h))


class _Transformer(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.h = nn.ModuleList([_Block(c) for _ in range(c.num_hidden_layers)])
        self.ln_f = _RMSNorm(c.hidden_size, c.layer_norm_epsilon)


class QwenV1(nn.Module):
    """Qwen v1's module tree (transformer.h.{i}.attn.c_attn, …, lm_head) with the spec's forward, float32."""

    def __init__(self, c: QwenConfig, tensors: dict[str, np.ndarray]):
        super().__init__()
        self.transformer, self.lm_head = _Transformer(c), nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()}
        self.load_state_dict(state, strict=True)
        self.eval()

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """peft's causal-LM wrapper reads this hook (QWenLMHeadModel has it); no cache: the whole prefix."""
        return {"input_ids": input_ids}

    def forward(self, input_ids):
        x = self.transformer.wte(input_ids)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def logits(model: nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).numpy()


def peft_qwen2(hf_model, factors: dict, r: int, alpha: float, num_layers: int):
    """peft's LoRA on Qwen2 holding our factors (numpy, our layout): c_attn's one A becomes q/k/v's shared A and
    its B splits into q, k and v; c_proj → o_proj, w1 → up_proj, w2 → gate_proj, mlp.c_proj → down_proj."""
    model = peft.get_peft_model(hf_model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                          target_modules=QWEN2_TARGETS))
    f = factors["layers"]
    with torch.no_grad():
        for i in range(num_layers):
            layer = model.base_model.model.model.layers[i]
            a = f["attn"]["c_attn"]["a"][i]
            b = f["attn"]["c_attn"]["b"][i].reshape(r, 3, -1)
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                _set(getattr(layer.self_attn, name), a, b[:, j])
            _set(layer.self_attn.o_proj, f["attn"]["c_proj"]["a"][i], f["attn"]["c_proj"]["b"][i])
            _set(layer.mlp.up_proj, f["mlp"]["w1w2"]["w1"]["a"][i], f["mlp"]["w1w2"]["w1"]["b"][i])
            _set(layer.mlp.gate_proj, f["mlp"]["w1w2"]["w2"]["a"][i], f["mlp"]["w1w2"]["w2"]["b"][i])
            _set(layer.mlp.down_proj, f["mlp"]["c_proj"]["a"][i], f["mlp"]["c_proj"]["b"][i])
    return model


def _set(module, a: np.ndarray, b: np.ndarray) -> None:
    module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(a, np.float32).T))
    module.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(b, np.float32).T))


def qwen2_grads(model, num_layers: int, r: int) -> dict:
    """peft's gradients mapped back to our layout (c_attn's A gradient is the sum of q, k and v's)."""

    def g(module, factor):
        return getattr(module, f"lora_{factor}")["default"].weight.grad.numpy().T

    out = {"c_attn": {"a": [], "b": []}, "c_proj": {"a": [], "b": []}, "w1": {"a": [], "b": []},
           "w2": {"a": [], "b": []}, "mlp_c_proj": {"a": [], "b": []}}
    for i in range(num_layers):
        layer = model.base_model.model.model.layers[i]
        qkv = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj")]
        out["c_attn"]["a"].append(sum(g(m, "A") for m in qkv))
        out["c_attn"]["b"].append(np.stack([g(m, "B") for m in qkv], axis=1))  # [r, 3, d]
        for key, module in (("c_proj", layer.self_attn.o_proj), ("w1", layer.mlp.up_proj),
                            ("w2", layer.mlp.gate_proj), ("mlp_c_proj", layer.mlp.down_proj)):
            out[key]["a"].append(g(module, "A"))
            out[key]["b"].append(g(module, "B"))
    return {k: {f: np.stack(v) for f, v in d.items()} for k, d in out.items()}
