"""Attention and long-context paths on the GPU: correctness against float32 references, and timings.

    PYTHONPATH=. python benchmarks/attention_gpu.py [--markdown BENCHMARKS.md]

Checks (each prints its error and must pass, else the script exits 1):
  - cuDNN flash attention (`attention.causal_self_attention` on a GPU) vs a float32 XLA reference, bf16 inputs;
  - attention over an int8 KV cache vs float32 attention over the unquantized keys and values;
  - the cache-attention kernel (qwen_jax.kernels.cache_attention) vs float32 XLA attention over the same cached
    values, bf16 and int8 caches, decode and a 256-token chunk, and stacks of 2-4 GiB read at their last layer
    (where 32-bit byte offsets would wrap);
  - a whole model with 72B's layer shapes (2 layers, int8 weights): prefill with flash attention vs prefill over
    the cache (XLA), decode through the kernel vs the XLA path, decode over an int8 cache vs a bf16 cache, the
    embedding table on the host vs on the device.
Timings: prefill attention of one layer, flash vs XLA, at 1k-8k tokens; attention over the cache, the kernel vs
XLA, bf16 and int8 caches, decode (batch 1 and 16) and a 256-token prefill chunk, at 2k-16k slots, all slots
attended. `--sweep` times kernel configs instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import describe, median_seconds, rel_err
from qwen_jax import attention
from qwen_jax import cache as kv_cache
from qwen_jax.bench import random_model
from qwen_jax.config import preset
from qwen_jax.kernels import cache_attention

HEADS, HEAD_DIM = 64, 128


def qkv(seed, batch, seq, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (batch, seq, HEADS, HEAD_DIM), jnp.float32).astype(dtype) for k in keys]


def cache_layout(*arrays):
    """[B, T, H, D] -> the KV cache's [B, H, T, D], which `attention.attend` takes."""
    return [jnp.swapaxes(a, 1, 2) for a in arrays]


def xla_self_attention(q, k, v, mask):
    """`attention.causal_self_attention`'s XLA path (which a GPU takes for float32 or under a mesh), forced."""
    return attention.attend(q, *cache_layout(k, v), mask)


def check(label: str, err: float, bound: float, failures: list) -> None:
    ok = err <= bound
    print(f"{'ok ' if ok else 'FAIL'} {label}: relative error {err:.2e} (bound {bound:.0e})")
    if not ok:
        failures.append(label)


def causal_mask(batch, seq):
    pos = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    return pos[:, None, :] <= pos[:, :, None]


def attention_checks(failures: list) -> None:
    # bf16 inputs: the fused kernel's probabilities and output are bf16-rounded (2^-8 relative) as are XLA's
    for batch, seq in ((1, 2048), (2, 512)):
        q, k, v = qkv(0, batch, seq)
        mask = causal_mask(batch, seq)
        want = xla_self_attention(*(a.astype(jnp.float32) for a in (q, k, v)), mask)
        flash = jax.jit(attention.causal_self_attention)(q, k, v, mask)
        check(f"flash attention, batch {batch} × {seq} tokens, vs float32", rel_err(flash, want), 1e-2, failures)
    q, k, v = qkv(1, 2, 300)
    q, (k, v) = q[:, -1:], cache_layout(k, v)
    (kq, ks), (vq, vs) = kv_cache.quantize(k), kv_cache.quantize(v)
    mask = jnp.ones((2, 1, 300), bool)
    want = attention.attend(*(a.astype(jnp.float32) for a in (q, k, v)), mask)
    got = jax.jit(attention.attend)(q, kq, vq, mask, ks, vs)
    check("decode attention over an int8 cache vs float32 over bf16 k/v", rel_err(got, want), 2e-2, failures)
    # layers, batch, query tokens, slots, kind: the last two are 3.4 GB stacks (bf16 k; int8 k as int32 words)
    for layers, batch, seq, slots, kind in ((3, 2, 1, 300, "bf16"), (3, 2, 1, 300, "int8"),
                                            (2, 1, 256, 2048, "bf16"), (2, 1, 256, 2048, "int8"),
                                            (80, 1, 1, 2560, "bf16"), (80, 1, 4, 5120, "int8")):
        cache, q, positions = cache_case(layers, batch, seq, slots, kind)
        got = jax.jit(cache_attention.attend)(q, positions, cache["k"], cache["v"], layers - 1,
                                               cache.get("k_scale"), cache.get("v_scale"))
        layer = kv_cache.read(cache, layers - 1)
        deq = [layer[n].astype(jnp.float32) * (layer[f"{n}_scale"].astype(jnp.float32)[..., None]
                                                if kind == "int8" else 1) for n in ("k", "v")]
        mask = jnp.arange(slots)[None, None, :] <= positions[:, :, None]
        want = jax.jit(attention.attend)(q.astype(jnp.float32), *deq, mask)
        nbytes = sum(a.nbytes for a in cache.values()) / 2 * 1e-9
        check(f"cache-attention kernel, {kind} cache {layers} layers × {slots} slots ({nbytes:.1f} GB per k), "
              f"batch {batch} × {seq} queries, last layer, vs float32", rel_err(got, want), 1e-2, failures)
        del cache


def cache_case(layers, batch, seq, slots, kind, seed=5):
    """A random stacked cache (bf16, or int8 values in words with scales), queries [B, S, H, D] and their
    positions [B, S]: the last S slots of each row."""
    shape = (layers, batch, HEADS, slots, HEAD_DIM)
    kk, kv, kq = jax.random.split(jax.random.key(seed), 3)
    cache = {}
    for name, key in (("k", kk), ("v", kv)):
        x = jax.random.normal(key, shape, jnp.bfloat16)
        if kind == "int8":  # a layer at a time: quantizing the whole stack at once holds float32 copies of it
            values, cache[f"{name}_scale"] = jax.lax.map(kv_cache.quantize, x)
            x = kv_cache.pack(values)
        cache[name] = x
        del x
    q = jax.random.normal(kq, (batch, seq, HEADS, HEAD_DIM), jnp.bfloat16)
    positions = jnp.broadcast_to(jnp.arange(slots - seq, slots, dtype=jnp.int32), (batch, seq))
    return cache, q, positions


def model_checks(failures: list, preset_name: str, group: int) -> None:
    config = preset(preset_name).replace(num_hidden_layers=2)
    model = random_model(config, group)
    batch, prompt, total = 2, 64, 72
    seqs = jnp.asarray(np.random.default_rng(0).integers(0, 151643, (batch, total)), jnp.int32)
    alpha = jnp.ones(batch, jnp.float32)

    def run(m, prefill):
        step = jax.jit(lambda p, ids, pos, c, pf: m.module(p, ids, pos, alpha, c, prefill=pf), static_argnums=4)
        cache = m.new_cache(batch, 128)
        pos = jnp.broadcast_to(jnp.arange(prompt, dtype=jnp.int32), (batch, prompt))
        logits, cache = step(m.params, seqs[:, :prompt], pos, cache, prefill)
        out = [logits[:, -1]]
        for p in range(prompt, total):
            logits, cache = step(m.params, seqs[:, p:p + 1], jnp.full((batch, 1), p, jnp.int32), cache, False)
            out.append(logits[:, 0])
        return np.stack([np.asarray(o)[:, :151851] for o in out], 1)

    over_cache = run(model, False)
    with xla_cache_attention():
        xla = run(model, False)
    check(f"{preset_name}-shaped model (2 layers): over the cache through the kernel vs the XLA path",
          rel_err(over_cache, xla), 2e-2, failures)
    check(f"{preset_name}-shaped model (2 layers): prefill with flash attention vs over the cache",
          rel_err(run(model, True)[:, 0], over_cache[:, 0]), 2e-2, failures)
    int8 = run(dataclasses.replace(model, kv_dtype=jnp.int8), True)
    check(f"{preset_name}-shaped model (2 layers): decode over an int8 cache vs a bf16 cache",
          rel_err(int8[:, 1:], over_cache[:, 1:]), 5e-2, failures)
    host = run(model.with_embedding_on_host(), True)
    check(f"{preset_name}-shaped model (2 layers): embedding table on the host vs on the device",
          rel_err(host, run(model, True)), 0.0, failures)


@contextlib.contextmanager
def xla_cache_attention():
    """Attention over the cache on XLA's path, as under a mesh of several devices."""
    applies = kv_cache.kernel_applies
    kv_cache.kernel_applies = lambda *args, **kwargs: False
    try:
        yield
    finally:
        kv_cache.kernel_applies = applies


def seconds_or_none(fn, *args) -> float | None:
    """Median seconds of fn(*args), or None if it runs out of device memory (the XLA path's [B, H, S, S] scores)."""
    try:
        return median_seconds(jax.jit(fn).lower(*args).compile(), *args)
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None


def timings() -> list[str]:
    rows = []
    for seq in (1024, 4096, 8192):
        q, k, v = qkv(2, 1, seq)
        mask = causal_mask(1, seq)
        flops = 4 * seq * seq * HEADS * HEAD_DIM / 2  # causal: half of QK^T and PV
        cells = []
        for label, fn in (("flash", attention.causal_self_attention), ("XLA", xla_self_attention)):
            t = seconds_or_none(fn, q, k, v, mask)
            cells.append(f"out of memory ({label})" if t is None else
                         f"{t * 1e3:.2f} ms, {flops / t / 1e12:.0f} TFLOP/s ({label})")
        rows.append(f"| prefill, 1 layer, causal | {seq} | {cells[0]} | {cells[1]} |")
    for batch, seq, slots in ((1, 1, 2048), (1, 1, 8192), (1, 1, 16384), (16, 1, 4096), (1, 256, 8192)):
        for kind in ("bf16", "int8"):
            cache, q, positions = cache_case(LOOP_LAYERS, batch, seq, slots, kind)
            cells = []
            for label, fn in (("kernel", kernel_fn(None)), ("XLA", xla_attend)):
                t = seconds_or_none(over_layers(fn), q, positions, cache)
                t = None if t is None else t / LOOP_LAYERS
                cells.append(f"out of memory ({label})" if t is None else
                             f"{t * 1e6:.0f} µs, {cache_gbs(cache, t):.0f} GB/s of cache ({label})")
            what = "decode" if seq == 1 else f"{seq}-token chunk"
            rows.append(f"| {what} over the {kind} cache, 1 layer, batch {batch} | {slots} | {cells[0]} | {cells[1]} |")
            del cache
    return rows


# Attention timings run over this many layers of a stacked cache in one `lax.fori_loop`, as in the model, and
# report the time per layer: a single call of a ~100 µs kernel is dominated by dispatch.
LOOP_LAYERS = 8


def over_layers(attend):
    def run(q, positions, cache):
        def body(layer, acc):
            return acc + attend(q, positions, cache, layer).astype(jnp.float32)
        return jax.lax.fori_loop(0, LOOP_LAYERS, body, jnp.zeros(q.shape, jnp.float32))
    return run


def kernel_fn(config):
    return lambda q, positions, cache, layer: cache_attention.attend(
        q, positions, cache["k"], cache["v"], layer, cache.get("k_scale"), cache.get("v_scale"), config=config)


def xla_attend(q, positions, cache, layer):
    with xla_cache_attention():
        return kv_cache.attend(cache, layer, q, positions)


def cache_gbs(cache, seconds) -> float:
    """GB/s of one layer's cache (k, v and scales of every row and slot) read in `seconds`."""
    return sum(a.nbytes for a in cache.values()) / LOOP_LAYERS / seconds / 1e9


def sweep() -> list[str]:
    """Kernel configs at decode, batch 1, 8192 slots, and a 256-token chunk: µs per layer."""
    rows = []
    for seq in (1, 256):
        for kind in ("bf16", "int8"):
            cache, q, positions = cache_case(LOOP_LAYERS, 1, seq, 8192, kind)
            for block_t in (32, 64, 128):
                for warps in (2, 4, 8):
                    for programs in ((264, 528, 1056) if seq == 1 else (528,)):
                        cfg = cache_attention.Config(block_s=16 if seq == 1 else 64, block_t=block_t,
                                                     num_warps=warps, min_programs=programs)
                        try:
                            t = seconds_or_none(over_layers(kernel_fn(cfg)), q, positions, cache) / LOOP_LAYERS
                        except Exception as e:  # a config Triton cannot compile (registers, shared memory)
                            rows.append(f"sweep {kind} seq {seq} {cfg}: {type(e).__name__}")
                            continue
                        rows.append(f"sweep {kind} seq {seq} {cfg}: {t * 1e6:.1f} µs, {cache_gbs(cache, t):.0f} GB/s")
            del cache
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="append the timing table to this file")
    parser.add_argument("--preset", default="72b", help="layer shapes of the whole-model checks")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sweep", action="store_true",
                        help="only time cache-attention kernel configs (no checks, no table)")
    args = parser.parse_args()
    if args.sweep:
        print("\n".join(sweep()))
        return 0
    failures: list[str] = []
    attention_checks(failures)
    model_checks(failures, args.preset, args.group_size)
    lines = [f"Attention, {describe()} (`PYTHONPATH=. python benchmarks/attention_gpu.py`); 64 heads × 128:", "",
             "| what | tokens / slots | time | time |", "|---|---|---|---|", *timings()]
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    if failures:
        print(f"FAILED: {failures}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
