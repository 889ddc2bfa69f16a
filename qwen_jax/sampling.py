"""Next-token selection in float32: repetition penalty, temperature, top-k, top-p (HF order and semantics).

Every knob is a per-row array, so changing a value never recompiles and rows of one batch may differ.
Randomness comes from (seed, index of the token in the row's output) alone, so a row samples the same tokens
whatever batch it is in, however it is padded, and however the loop is chunked.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SamplingParams:
    do_sample: jax.Array  # [B] bool; False = greedy (after the repetition penalty)
    temperature: jax.Array  # [B] float32 > 0
    top_k: jax.Array  # [B] int32; 0 = off
    top_p: jax.Array  # [B] float32 in (0, 1]; 1 = off
    repetition_penalty: jax.Array  # [B] float32; 1 = off
    seed: jax.Array  # [B] uint32


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """logits [B, V], seen [B, V] bool (ids in prompt or output), penalty [B]: score/p if > 0 else score*p."""
    p = penalty[:, None]
    penalized = jnp.where(logits > 0, logits / p, logits * p)
    return jnp.where(seen, penalized, logits)


def filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask to -inf what top-k, then top-p (nucleus over the top-k survivors), remove. logits [B, V].

    Keeps a token iff the probability mass of strictly better-ranked tokens is < top_p, as HF's
    `TopPLogitsWarper` (which removes tokens whose ascending cumulative mass is <= 1 - top_p); the best token
    always stays. Tokens tied with the last kept one are kept too.
    """
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    sorted_desc = jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) | (jnp.arange(vocab) == 0)
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(threshold, kth)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def select(logits: jax.Array, seen: jax.Array, params: SamplingParams, index: jax.Array) -> jax.Array:
    """logits [B, V] float32, seen [B, V] bool, index [B] (output position) -> next token ids [B] int32."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, params.repetition_penalty)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(logits):
        scaled = logits / params.temperature[:, None]
        needs_filter = jnp.any(params.do_sample & ((params.top_k > 0) | (params.top_p < 1.0)))
        # The sort behind top-k/top-p costs O(V log V) per row: skip it when no row asks for a filter.
        scaled = jax.lax.cond(needs_filter, lambda s: filter_top_k_top_p(s, params.top_k, params.top_p),
                              lambda s: s, scaled)

        def one(seed, i, row):
            key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            return jax.random.categorical(key, row)

        return jax.vmap(one)(params.seed, index, scaled).astype(jnp.int32)

    chosen = jax.lax.cond(jnp.any(params.do_sample), sampled, lambda _: greedy, logits)
    return jnp.where(params.do_sample, chosen, greedy)
