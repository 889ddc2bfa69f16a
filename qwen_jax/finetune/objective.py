"""The training objective: next-token cross-entropy over the kept labels, as a function of the LoRA factors only."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.finetune import lora
from qwen_jax.model import Qwen, apply

IGNORE = -100  # label of a position that is not trained on (Qwen's IGNORE_TOKEN_ID, HF's ignore_index)


def nll_sum(module: Qwen, params: dict, ids: jax.Array, labels: jax.Array, mesh=None, rules=()):
    """ids, labels [B, S] int32 -> (summed negative log-likelihood of labels[:, 1:] given ids[:, :-1], label count).

    Positions are 0..S-1 in every row and NTK/logn scaling is off, as Qwen's modeling code does while training
    (right padding never reaches a real token: attention is causal)."""
    batch, seq = ids.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    logits, _ = apply(module, params, ids, positions, jnp.ones((batch,), jnp.float32), mesh=mesh, rules=rules)
    logits = logits[:, :-1]  # [B, S-1, vocab] float32, padded vocabulary at -inf
    targets = labels[:, 1:]
    kept = targets != IGNORE
    picked = jnp.take_along_axis(logits, jnp.where(kept, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(kept, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
    return nll.sum(), kept.sum()


def loss(factors: dict, base: dict, ids: jax.Array, labels: jax.Array, *, module: Qwen, scale: float,
         dropout_rate: float = 0.0, dropout_key: jax.Array | None = None, mesh=None, rules=()):
    """Mean next-token loss over kept labels (HF's mean over non-ignored tokens) and (nll sum, label count)."""
    params = lora.attach(base, factors, scale, dropout_rate, dropout_key)
    total, count = nll_sum(module, params, ids, labels, mesh, rules)
    return total / jnp.maximum(count, 1), (total, count)
