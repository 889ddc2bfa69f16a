"""Prefill, then a decode loop that runs on the device (`lax.while_loop`), with per-row stopping.

Shapes are bucketed (prompt length, cache length, output buffer: powers of two, then multiples of 512), so a
chat session compiles a handful of programs and then reuses them; sampling knobs, limits and seeds are traced
values and never recompile. Streaming runs the same loop in chunks of steps and reads the tokens back between chunks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import cache as kv_cache
from qwen_jax import sampling
from qwen_jax import sharding as sharding_lib
from qwen_jax.kernels import int8_matmul
from qwen_jax.model import Qwen, QwenModel, apply

MIN_BUCKET = 16
LINEAR_BUCKET = 1024  # past this, buckets grow by BUCKET_STEP: a power of two would nearly double a long cache
BUCKET_STEP = 512
PREFILL_CHUNK = 256  # tokens per prefill call for prompts longer than LINEAR_BUCKET (divides every such bucket)


def bucket(n: int) -> int:
    """The padded size of a dimension that varies per request (prompt, cache, output lengths): the power of two
    >= n (at least MIN_BUCKET) up to LINEAR_BUCKET, then the multiple of BUCKET_STEP >= n."""
    if n > LINEAR_BUCKET:
        return -(-int(n) // BUCKET_STEP) * BUCKET_STEP
    return max(MIN_BUCKET, 1 << (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Generation options; defaults come from the checkpoint's generation_config.json, then per-call kwargs."""

    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.8
    repetition_penalty: float = 1.1
    seed: int | None = None
    stop_words_ids: tuple[tuple[int, ...], ...] = ()
    max_window_size: int = 6144

    @classmethod
    def resolve(cls, checkpoint_defaults: dict[str, Any], **overrides) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; known: {sorted(names)}")
        values = {k: v for k, v in checkpoint_defaults.items() if k in names and v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None or k == "seed"})
        values["stop_words_ids"] = tuple(tuple(int(t) for t in seq) for seq in values.get("stop_words_ids", ()))
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if any(len(seq) == 0 for seq in self.stop_words_ids):
            raise ValueError("stop_words_ids must not contain an empty sequence")


@flax.struct.dataclass
class DecodeState:
    cache: list
    tokens: jax.Array  # [B, N] int32 output buffer
    num_generated: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    stop_len: jax.Array  # [B] int32: length of the stop sequence that ended the row (0 = none)
    seen: jax.Array  # [B, V] bool: ids in the prompt or output (repetition penalty)
    prompt_len: jax.Array  # [B] int32
    ntk_alpha: jax.Array  # [B] float32, fixed at prefill
    steps: jax.Array  # [] int32 decode steps run


def stop_match_len(tokens: jax.Array, num: jax.Array, stops: jax.Array) -> jax.Array:
    """Length of a stop sequence that the first `num[b]` tokens of row b end with (0 = none).

    tokens [B, N]; stops [n_stops, W] int32, right-aligned, padded on the left with -1.
    """
    if stops.shape[0] == 0:
        return jnp.zeros(num.shape, jnp.int32)
    width = stops.shape[1]
    idx = num[:, None] - width + jnp.arange(width)[None, :]  # [B, W]
    window = jnp.where(idx >= 0, jnp.take_along_axis(tokens, jnp.maximum(idx, 0), axis=1), -2)
    used = stops >= 0  # [n_stops, W]
    match = jnp.all(~used[None] | (window[:, None, :] == stops[None]), axis=-1)  # [B, n_stops]
    return jnp.max(jnp.where(match, used.sum(-1)[None], 0), axis=-1).astype(jnp.int32)


def _append(state: DecodeState, token: jax.Array, stops: jax.Array, max_new: jax.Array) -> DecodeState:
    """Record `token` [B] for the rows still running; end rows on a stop sequence or at max_new tokens."""
    active = ~state.done
    rows = jnp.arange(token.shape[0])
    slot = jnp.arange(state.tokens.shape[1])[None, :] == state.num_generated[:, None]
    tokens = jnp.where(slot & active[:, None], token[:, None], state.tokens)
    num = state.num_generated + active.astype(jnp.int32)
    seen = state.seen.at[rows, token].set(state.seen[rows, token] | active)
    match = stop_match_len(tokens, num, stops)
    done = state.done | (active & ((match > 0) | (num >= max_new)))
    stop_len = jnp.where(active, match, state.stop_len)
    return state.replace(tokens=tokens, num_generated=num, done=done, stop_len=stop_len, seen=seen)


@functools.partial(jax.jit, static_argnames=("module", "first", "mesh", "rules"), donate_argnames=("cache", "logits"))
def _prefill_chunk(module: Qwen, params, ids, start, prompt_len, ntk_alpha, cache, logits, first: bool, mesh=None,
                   rules=()):
    """Write tokens start … start + C - 1 of every row (ids [B, C]; start an int32 scalar) to the cache.

    `first`: the rows' first chunk (start = 0), whose tokens attend only to each other (flash attention on a GPU);
    later chunks attend over the cache. logits [B, 1, V] carries each row's logits at its last prompt token
    (prompt_len - 1), replaced by this chunk's where the chunk holds that token.
    """
    batch, size = ids.shape
    positions = jnp.broadcast_to(start + jnp.arange(size, dtype=jnp.int32), (batch, size))
    last = prompt_len - 1
    index = jnp.clip(last - start, 0, size - 1)
    new, cache = apply(module, params, ids, positions, ntk_alpha, cache, logits_index=index, prefill=first,
                       mesh=mesh, rules=rules)
    here = (last >= start) & (last < start + size)
    return jnp.where(here[:, None, None], new, logits), cache


@functools.partial(jax.jit, static_argnames=("buffer_len",), donate_argnames=("cache", "logits"))
def _first_token(ids, prompt_len, ntk_alpha, cache, logits, params_sampling, stops, max_new, buffer_len):
    """The DecodeState after a prefill: ids [B, S] the padded prompts, logits [B, 1, V] at their last tokens."""
    batch, seq = ids.shape
    in_prompt = jnp.arange(seq)[None, :] < prompt_len[:, None]
    seen = jnp.zeros((batch, logits.shape[-1]), bool).at[jnp.arange(batch)[:, None], ids].max(in_prompt)
    state = DecodeState(
        cache=cache, tokens=jnp.zeros((batch, buffer_len), jnp.int32), num_generated=jnp.zeros(batch, jnp.int32),
        done=jnp.zeros(batch, bool), stop_len=jnp.zeros(batch, jnp.int32), seen=seen, prompt_len=prompt_len,
        ntk_alpha=ntk_alpha, steps=jnp.zeros((), jnp.int32))
    token = sampling.select(logits[:, 0], seen, params_sampling, state.num_generated)
    return _append(state, token, stops, max_new)


def prefill_chunk(seq: int) -> int:
    """Tokens per prefill call for a padded prompt length: all of it, or PREFILL_CHUNK past LINEAR_BUCKET."""
    return seq if seq <= LINEAR_BUCKET else PREFILL_CHUNK


def plan_prefill(model: QwenModel, batch: int, seq: int, max_len: int, resident: dict[str, int] | None = None) -> int:
    """The prefill chunk for a request, after the memory preflight (cache.MemoryPreflightError if nothing fits);
    `resident`: bytes that stay allocated beside it (QwenModel.preflight).

    `prefill_chunk(seq)` first. If that does not fit and the weights are int8, chunks of at most
    int8_matmul.MAX_KERNEL_M rows in all: every matmul then runs the int8 kernel, which needs no dequantized copy
    of a layer (0.75 GiB on 72B), for a slower prefill. On one H100 that is what lets 72B-Int8 take a 5120-token
    prompt (BENCHMARKS.md). A refusal gives the smaller plan's numbers.
    """
    chunk = prefill_chunk(seq)
    lean = 1 << max(0, (int8_matmul.MAX_KERNEL_M // batch).bit_length() - 1)  # a power of two: divides seq
    try:
        model.preflight(batch, seq, max_len, chunk, resident)
        return chunk
    except kv_cache.MemoryPreflightError:
        if not model.quant_group or batch * lean > int8_matmul.MAX_KERNEL_M or lean >= chunk:
            raise
    model.preflight(batch, seq, max_len, lean, resident)
    return lean


def _prefill(module: Qwen, params, ids, prompt_len, ntk_alpha, cache, params_sampling, stops, max_new, buffer_len,
             mesh=None, rules=(), chunk: int | None = None) -> DecodeState:
    """ids [B, S] right-padded, prompt_len [B] -> DecodeState holding the first generated token.

    Prompts longer than LINEAR_BUCKET are prefilled in chunks of PREFILL_CHUNK tokens (`chunk` overrides), so that
    a prefill's activations and attention scores scale with the chunk, not the prompt (cache.request_bytes_per_device
    counts them so). Every chunk after the first compiles to one program.
    """
    batch, seq = ids.shape
    chunk = chunk or prefill_chunk(seq)
    if seq % chunk:
        raise ValueError(f"prefill chunk {chunk} must divide the padded prompt length {seq}")
    logits = jnp.zeros((batch, 1, module.config.vocab_size), jnp.float32)
    for start in range(0, seq, chunk):
        logits, cache = _prefill_chunk(module, params, ids[:, start:start + chunk], jnp.asarray(start, jnp.int32),
                                       prompt_len, ntk_alpha, cache, logits, start == 0, mesh=mesh, rules=rules)
    return _first_token(ids, prompt_len, ntk_alpha, cache, logits, params_sampling, stops, max_new, buffer_len)


@functools.partial(jax.jit, static_argnames=("module", "mesh", "rules"), donate_argnames=("state",))
def _decode(module: Qwen, params, state: DecodeState, params_sampling, stops, max_new, limit, mesh=None,
            rules=()) -> DecodeState:
    """Decode until every row is done or `limit` steps have run in total (a traced bound: no recompile)."""
    rows = jnp.arange(state.tokens.shape[0])

    def cond(s):
        return (s.steps < limit) & ~jnp.all(s.done)

    def body(s):
        last = s.tokens[rows, s.num_generated - 1]
        position = s.prompt_len + s.num_generated - 1
        logits, cache = apply(module, params, last[:, None], position[:, None], s.ntk_alpha, s.cache, mesh=mesh,
                              rules=rules)
        token = sampling.select(logits[:, 0], s.seen, params_sampling, s.num_generated)
        return _append(s.replace(cache=cache, steps=s.steps + 1), token, stops, max_new)

    return jax.lax.while_loop(cond, body, state)


@dataclasses.dataclass
class Generation:
    """One row's result: output ids (stop sequence excluded), why it ended, and token counts."""

    tokens: list[int]
    finish_reason: str | None  # "stop" | "length"; None while the row is still running (streaming)
    num_prompt_tokens: int
    seed: int


def _stop_table(stop_sequences: Sequence[Sequence[int]]) -> np.ndarray:
    width = max((len(s) for s in stop_sequences), default=1)
    table = np.full((len(stop_sequences), width), -1, np.int32)
    for i, seq in enumerate(stop_sequences):
        table[i, width - len(seq):] = seq
    return table


def _sampling_params(gen: GenerationConfig, seeds: Sequence[int]) -> sampling.SamplingParams:
    batch = len(seeds)

    def full(value, dtype):
        return jnp.full((batch,), value, dtype)

    return sampling.SamplingParams(
        do_sample=full(gen.do_sample, bool), temperature=full(gen.temperature, jnp.float32),
        top_k=full(gen.top_k, jnp.int32), top_p=full(gen.top_p, jnp.float32),
        repetition_penalty=full(gen.repetition_penalty, jnp.float32), seed=jnp.asarray(seeds, jnp.uint32))


def row_seeds(seed: int | None, batch: int) -> list[int]:
    """Row i samples with seed + i (so generating row i alone with seed + i gives the same text)."""
    base = int(np.random.default_rng().integers(0, 2**31)) if seed is None else int(seed)
    return [(base + i) % 2**32 for i in range(batch)]


def generate_tokens(model: QwenModel, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
                    stop_sequences: Sequence[Sequence[int]] = (), chunk: int | None = None) -> Iterator[list[Generation]]:
    """Generate for a batch of token-id prompts (ragged lengths), each row stopping on its own.

    Yields the rows' partial results after every `chunk` decode steps (streaming), and always a final result
    last. Without `chunk` the whole decode loop is one device call.
    """
    if not prompts:
        raise ValueError("no prompts given")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty: a prompt needs at least one token")
    config, batch = model.config, len(prompts)
    seq = bucket(max(lengths))
    max_len = bucket(max(seq, max(lengths) + gen.max_new_tokens))
    ids = np.full((batch, seq), 151643, np.int32)  # pad with <|endoftext|>; never attended
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    seeds = row_seeds(gen.seed, batch)
    params_sampling = _sampling_params(gen, seeds)
    stops = jnp.asarray(_stop_table([*stop_sequences, *gen.stop_words_ids]))
    ntk_alpha = jnp.asarray([config.ntk_alpha(n) for n in lengths], jnp.float32)
    max_new = jnp.asarray(gen.max_new_tokens, jnp.int32)
    prefill_tokens = plan_prefill(model, batch, seq, max_len)
    cache = model.new_cache(batch, max_len)
    state = _prefill(model.module, model.params, jnp.asarray(ids), jnp.asarray(lengths, jnp.int32), ntk_alpha,
                     cache, params_sampling, stops, max_new, bucket(gen.max_new_tokens), **model.placement,
                     chunk=prefill_tokens)
    limit = 0
    while True:
        limit = gen.max_new_tokens if chunk is None else limit + chunk
        state = _decode(model.module, model.params, state, params_sampling, stops, max_new, jnp.asarray(limit),
                        **model.placement)
        tokens, num, done, stop_len = sharding_lib.to_host((state.tokens, state.num_generated, state.done,
                                                            state.stop_len))
        finished = bool(done.all())
        reasons = ["stop" if stop_len[r] else "length" if done[r] else None for r in range(batch)]
        yield [Generation(tokens[r, :num[r] - stop_len[r]].tolist(), reasons[r], lengths[r], seeds[r])
               for r in range(batch)]
        if finished:
            return


# --- continuous batching: a fixed set of slots whose rows are replaced as requests finish (qwen_jax.batch) ------


def idle_state(cache, batch: int, buffer_len: int, vocab_size: int) -> DecodeState:
    """A DecodeState whose `batch` rows are all free: done, with one dummy token at position 0.

    num_generated = prompt_len = 1 keeps an idle row's decode position at 0 (never negative) while `_decode`
    steps the other rows; what it writes there is overwritten when a request is inserted into the row.
    """
    # Distinct buffers per field: the state is donated, and one buffer may not be donated twice.
    return DecodeState(
        cache=cache, tokens=jnp.zeros((batch, buffer_len), jnp.int32), num_generated=jnp.ones(batch, jnp.int32),
        done=jnp.ones(batch, bool), stop_len=jnp.zeros(batch, jnp.int32), seen=jnp.zeros((batch, vocab_size), bool),
        prompt_len=jnp.ones(batch, jnp.int32), ntk_alpha=jnp.ones(batch, jnp.float32), steps=jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, donate_argnames=("state",))
def insert_rows(state: DecodeState, group: DecodeState, slots: jax.Array) -> DecodeState:
    """Copy row g of `group` (e.g. `_prefill`'s output) into row slots[g] of `state`; slots [G] int32.

    A slot index >= state's batch drops that group row (padding rows of a fixed-size group), so one program
    serves every admission. The cache must have the same max_len and the tokens buffer the same length.
    `steps` is the running state's (its step limit keeps counting across admissions).
    """
    def put(dst, src, axis):
        index = (slice(None),) * axis + (slots,)
        return dst.at[index].set(src.astype(dst.dtype), mode="drop")

    cache = {name: put(state.cache[name], group.cache[name], 1) for name in state.cache}  # [L, B, H, T, hd]
    rows = {f: put(getattr(state, f), getattr(group, f), 0)
            for f in ("tokens", "num_generated", "done", "stop_len", "seen", "prompt_len", "ntk_alpha")}
    return state.replace(cache=cache, **rows)
