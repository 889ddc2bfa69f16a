"""Layer layout: separate per-layer arrays in a Python-unrolled loop vs one stacked array under lax.scan.

    PYTHONPATH=. python benchmarks/layer_layout.py [--layers 4] [--compile-layers 80] [--markdown FILE]

On a GPU: a batch-1 decode-like step (S = 1, int8 weights with float16 group-128 scales, 72B dims) through
L layers, in ms/step and GB/s of weight bytes, for the XLA int8 path (qwen_jax.quant.reference_matmul) and the Pallas kernel
(qwen_jax.kernels.int8_matmul). The kernel has a third layout: the stack under a loop, the kernel reading layer i
in place (`layer=i`) instead of XLA slicing it. Everywhere (CPU too): lower and compile time of `--compile-layers`
layers at small dims. The minimal block is the real one's weight traffic: RMS norms, fused QKV, attention of a
lone token to itself, attn.c_proj, fused w1|w2 with SiLU gate, mlp.c_proj.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
from jax import lax

import timing
from qwen_jax import quant
from qwen_jax.kernels import int8_matmul as km

DIMS_72B = dict(d=8192, heads=64, head_dim=128, mlp=24576)
GROUP = 128


def weight_shapes(d, heads, head_dim, mlp):
    """name -> (K, N shape) of the four int8 linears of a block."""
    return {
        "c_attn": (d, (3, heads, head_dim)),
        "attn_c_proj": (heads * head_dim, (d,)),
        "w1w2": (d, (2, mlp)),
        "mlp_c_proj": (mlp, (d,)),
    }


def _rms(x):
    x32 = x.astype(jnp.float32)
    return (x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


def block(x, w, mm):
    """x [B, D] -> [B, D]; w[name] = (qvalue, scales); mm(x, qvalue, scales) is the int8 matmul."""
    b, d = x.shape
    qkv = mm(_rms(x), *w["c_attn"])  # [B, 3, H, hd]
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    # A lone token attends only to itself (softmax of one score is 1): the output is v; the q·k gate keeps the
    # q and k columns live, so XLA cannot drop them from the c_attn read.
    gate = jax.nn.sigmoid(jnp.sum(q.astype(jnp.float32) * k, axis=-1, keepdims=True) * q.shape[-1] ** -0.5)
    h = x + mm((v * gate.astype(v.dtype)).reshape(b, d), *w["attn_c_proj"])
    up_gate = mm(_rms(h), *w["w1w2"])  # [B, 2, F]
    return h + mm(up_gate[:, 0] * jax.nn.silu(up_gate[:, 1]), *w["mlp_c_proj"])


def xla_mm(x, q, s, layer=None):
    if layer is not None:
        q, s = q[layer], s[layer]
    return quant.reference_matmul(x, {"qvalue": q, "scales": s})


MATMULS = {"xla": xla_mm, "kernel": km.matmul}


def step_fn(layout: str, mm):
    """The decode step over all layers for one layout: (x [B, D], params) -> x."""
    if layout == "unrolled":  # params: list of per-layer dicts
        def step(x, params):
            for w in params:
                x = block(x, w, mm)
            return x
    elif layout == "scan":  # params: dict of [L, ...] stacks, sliced by scan
        def step(x, params):
            return lax.scan(lambda x, w: (block(x, w, mm), None), x, params)[0]
    else:  # "scan+index": the stack stays whole; the matmul reads layer i in place
        def step(x, params):
            n_layers = jax.tree.leaves(params)[0].shape[0]
            return lax.fori_loop(0, n_layers, lambda i, x: block(x, params, functools.partial(mm, layer=i)), x)
    return step


def layouts_for(path: str) -> list[str]:
    return ["unrolled", "scan"] + (["scan+index"] if path == "kernel" else [])


def stacked_params(key, n_layers, shapes):
    params = {}
    for name, (k, n_shape) in shapes.items():
        key, sub = jax.random.split(key)
        params[name] = jax.vmap(lambda kk: timing.int8_weight(kk, k, n_shape, GROUP))(jax.random.split(sub, n_layers))
    return params


def abstract_params(layout, n_layers, shapes):
    def one(lead):
        return {name: (jax.ShapeDtypeStruct((*lead, k, *n), jnp.int8),
                       jax.ShapeDtypeStruct((*lead, k // GROUP, *n), jnp.float16))
                for name, (k, n) in shapes.items()}
    return [one(()) for _ in range(n_layers)] if layout == "unrolled" else one((n_layers,))


def decode_rows(n_layers: int, batch: int, copy_gbs: float) -> list[str]:
    shapes = weight_shapes(**DIMS_72B)
    stacked = stacked_params(jax.random.key(0), n_layers, shapes)
    separate = [jax.tree.map(lambda a: a[i], stacked) for i in range(n_layers)]  # own buffers, as in the model
    total = sum(timing.weight_bytes(*w) for w in stacked.values())
    x = jax.random.normal(jax.random.key(1), (batch, DIMS_72B["d"]), jnp.bfloat16)
    rows, outputs = [], {}
    for path, mm in MATMULS.items():
        for layout in layouts_for(path):
            params = separate if layout == "unrolled" else stacked
            if path == "kernel" and not km.supported(x, *stacked["c_attn"], layer=0):
                continue
            f = jax.jit(step_fn(layout, mm)).lower(x, params).compile()
            seconds = timing.median_seconds(f, x, params, reps=20)
            outputs[(path, layout)] = f(x, params).astype(jnp.float32)
            gbs = total / seconds / 1e9
            rows.append(f"| {timing.describe()} | {layout} | {path} | {n_layers} | {batch} | {seconds * 1e3:.2f} | "
                        f"{gbs:.0f} | {100 * gbs / copy_gbs:.0f}% |")
            print(rows[-1], flush=True)
    ref = outputs[("xla", "unrolled")]
    for key, y in outputs.items():  # every layout and path computes the same step
        err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
        print(f"  {key}: relative difference to xla/unrolled {err:.2e}")
    return rows


def compile_rows(n_layers: int, d: int, describe: str) -> list[str]:
    dims = dict(d=d, heads=d // 128, head_dim=128, mlp=d * 11 // 4 // 128 * 128)
    shapes = weight_shapes(**dims)
    x = jax.ShapeDtypeStruct((1, d), jnp.bfloat16)
    rows = []
    for path, mm in MATMULS.items():
        if path == "kernel" and jax.default_backend() != "gpu":
            continue
        for layout in layouts_for(path):
            t0 = time.perf_counter()
            lowered = jax.jit(step_fn(layout, mm)).lower(x, abstract_params(layout, n_layers, shapes))
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            rows.append(f"| {describe} | {layout} | {path} | {n_layers} | D={d}, MLP={dims['mlp']} | "
                        f"{t1 - t0:.2f} | {t2 - t1:.2f} |")
            print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 4 layers keep every stack under 2 GiB, so the kernel reads each in place (int8 stacks of 2-4 GiB go through
    # a slice: see int8_matmul); 22 layers (all stacks outside 2-4 GiB) ran out of memory in the XLA path.
    parser.add_argument("--layers", type=int, default=4, help="layers in the 72B-dims decode step (GPU only)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compile-layers", type=int, default=80)
    parser.add_argument("--compile-dim", type=int, default=1024)
    parser.add_argument("--markdown", default="BENCHMARKS.md", help="file to append the result rows to")
    args = parser.parse_args()
    gpu = jax.default_backend() == "gpu"
    lines = []
    if gpu:
        copy_gbs = timing.copy_bandwidth()
        print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
        lines += [f"Decode step, int8 72B dims, copy bandwidth {copy_gbs:.0f} GB/s "
                  f"(`PYTHONPATH=. python benchmarks/layer_layout.py --layers {args.layers}`):", "",
                  "| device, jax, date | layout | matmul | layers | batch | ms/step | GB/s | % of copy |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += decode_rows(args.layers, args.batch, copy_gbs) + [""]
    lines += [f"Compile time, {args.compile_layers} layers "
              f"(`PYTHONPATH=. python benchmarks/layer_layout.py --compile-layers {args.compile_layers}`):", "",
              "| device, jax, date | layout | matmul | layers | dims | lower s | compile s |", "|---|---|---|---|---|---|---|"]
    lines += compile_rows(args.compile_layers, args.compile_dim, timing.describe() if gpu else timing.host()) + [""]
    timing.append_markdown(args.markdown, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
