"""Attention and long-context paths on the GPU: correctness against float32 references, and timings.

    PYTHONPATH=. python benchmarks/attention_gpu.py [--markdown BENCHMARKS.md]

Checks (each prints its error and must pass, else the script exits 1):
  - cuDNN flash attention (`attention.causal_self_attention` on a GPU) vs a float32 XLA reference, bf16 inputs;
  - attention over an int8 KV cache vs float32 attention over the unquantized keys and values;
  - a whole model with 72B's layer shapes (2 layers, int8 weights): prefill with flash attention vs prefill over
    the cache (XLA), decode over an int8 cache vs a bf16 cache, the embedding table on the host vs on the device.
Timings: prefill attention of one layer, flash vs XLA, at 1k-8k tokens; decode attention over a bf16 vs an int8
cache at 2k-8k slots (keys and values in the cache's [batch, heads, slots, head_dim] layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import describe, median_seconds, rel_err
from qwen_jax import attention
from qwen_jax import cache as kv_cache
from qwen_jax import sharding as sharding_lib
from qwen_jax.bench import random_params
from qwen_jax.config import preset
from qwen_jax.model import QwenModel

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


def model_checks(failures: list, preset_name: str, group: int) -> None:
    config = preset(preset_name).replace(num_hidden_layers=2)
    mesh = sharding_lib.make_mesh({"data": 1, "model": 1}, jax.devices()[:1])
    params = random_params(config, jnp.bfloat16, group, mesh, ())
    model = QwenModel(config, params, jnp.bfloat16, group, mesh=mesh, rules=())
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
    check(f"{preset_name}-shaped model (2 layers): prefill with flash attention vs over the cache",
          rel_err(run(model, True)[:, 0], over_cache[:, 0]), 2e-2, failures)
    int8 = run(dataclasses.replace(model, kv_dtype=jnp.int8), True)
    check(f"{preset_name}-shaped model (2 layers): decode over an int8 cache vs a bf16 cache",
          rel_err(int8[:, 1:], over_cache[:, 1:]), 5e-2, failures)
    host = run(model.with_embedding_on_host(), True)
    check(f"{preset_name}-shaped model (2 layers): embedding table on the host vs on the device",
          rel_err(host, run(model, True)), 0.0, failures)


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
    for slots in (2048, 8192):
        q = qkv(3, 1, 1)[0]
        k, v = cache_layout(*qkv(4, 1, slots)[1:])
        mask = jnp.ones((1, 1, slots), bool)
        (kq, ks), (vq, vs) = kv_cache.quantize(k), kv_cache.quantize(v)
        t16 = seconds_or_none(attention.attend, q, k, v, mask)
        t8 = seconds_or_none(attention.attend, q, kq, vq, mask, ks, vs)
        b16, b8 = 2 * k.nbytes, kq.nbytes + vq.nbytes + ks.nbytes + vs.nbytes
        rows.append(f"| decode, 1 layer, batch 1 | {slots} | {t16 * 1e6:.0f} µs, {b16 / t16 / 1e9:.0f} GB/s of "
                    f"cache (bf16) | {t8 * 1e6:.0f} µs, {b8 / t8 / 1e9:.0f} GB/s of cache (int8) |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="append the timing table to this file")
    parser.add_argument("--preset", default="72b", help="layer shapes of the whole-model checks")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
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
