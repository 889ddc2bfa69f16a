"""One device call's worth of evidence for the decode matmul (issue 13): ceilings, kernel variants, a profile.

    PYTHONPATH=.:benchmarks python benchmarks/decode_probe.py [--shapes w1w2,attn.c_proj] [--ms 1,16]
    ncu --clock-control none -k regex:int8_matmul -c 2 ... python benchmarks/decode_probe.py --ncu

Prints (1) the read ceiling: a streaming read of 4 GiB by a Pallas kernel and by an XLA reduction, and cuBLAS's
bf16 GEMV, best of each; the copy bandwidth of a Pallas copy kernel and of XLA's `x * 2`; (2) per 72B shape and M,
the int8 kernel's variants (convert "cvt" / "asm" / "asm16", tiles, pipelining) checked against float32 and timed,
as µs, GB/s and % of the read ceiling, best per (form, conversion). `--ncu` runs only the calls to profile.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

import int8_matmul as bench
import timing
from qwen_jax.kernels import int8_matmul as km

GIB4 = 4 * 2**30
COLS = 1024  # uint32 words per row of the streamed array


def _read_kernel(x_ref, o_ref):
    o_ref[0] = jnp.sum(x_ref[...])


def _copy_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...]


def pallas_read(x, rows: int, warps: int):
    return pl.pallas_call(
        _read_kernel, grid=(x.shape[0] // rows,),
        in_specs=[pl.BlockSpec((rows, COLS), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((1,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0] // rows,), jnp.uint32),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1))(x)


def pallas_copy(x, rows: int, warps: int):
    return pl.pallas_call(
        _copy_kernel, grid=(x.shape[0] // rows,),
        in_specs=[pl.BlockSpec((rows, COLS), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((rows, COLS), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1))(x)


def ceilings() -> dict[str, float]:
    x = jax.random.bits(jax.random.key(0), (GIB4 // 4 // COLS, COLS), jnp.uint32)
    out = {}

    def best(label, fns, bytes_moved, array):
        gbs = []
        for fn in fns:
            f = jax.jit(fn).lower(array).compile()
            gbs.append(bytes_moved / timing.median_seconds(f, array, reps=10) / 1e9)
        out[label] = max(gbs)
        print(f"  {label}: {' / '.join(f'{g:.0f}' for g in gbs)} GB/s", flush=True)

    best("read: Pallas sum", [functools.partial(pallas_read, rows=r, warps=w) for r in (16, 32) for w in (4, 8)],
         GIB4, x)
    best("read: XLA row sums", [lambda a: jnp.sum(a, axis=1), lambda a: jnp.sum(a, axis=0)], GIB4, x)
    best("copy: Pallas", [functools.partial(pallas_copy, rows=r, warps=w) for r in (16,) for w in (8,)], 2 * GIB4, x)
    best("copy: XLA x*2", [lambda a: a * 2], 2 * GIB4, x)
    del x
    k, n = bench.SHAPES["w1w2"]
    ws = [jax.random.normal(key, (k, n), jnp.bfloat16) for key in jax.random.split(jax.random.key(1), 4)]
    xs = [jax.random.normal(jax.random.key(2), (1, k), jnp.bfloat16)] * len(ws)
    seconds, _ = timing.per_call_seconds(bench.bf16_path, list(zip(xs, ws)), reps=10)
    out["read: cuBLAS bf16 GEMV"] = 2 * k * n / seconds / 1e9
    print(f"  read: cuBLAS bf16 GEMV 8192x49152 M=1: {out['read: cuBLAS bf16 GEMV']:.0f} GB/s", flush=True)
    return out


def variants(k: int, n: int, m: int) -> list[km.Config]:
    base = km.default_config(m, k, n, bench.GROUP)
    cfgs = [base, dataclasses.replace(base, convert="asm")]
    if m <= 4:
        bm = 1 if m == 1 else 4
        cfgs += [km.Config(bm, bn, g, s, w, 3, "fma", "asm") for bn in (128, 256, 512) for g in (1, 2)
                 for s in (4, 8, 16) for w in (4, 8)]
    else:
        cfgs += [km.Config(16 if m <= 16 else 64, bn, 1, s, 4, 4, "xw", convert) for convert in ("cvt", "asm16")
                 for bn in (64, 128, 256) for s in (1, 2, 4, 8, 16)]
    return [c for c in dict.fromkeys(cfgs) if bench._ok(k, n, c) and 128 <= n // c.block_n * c.k_splits <= 4096]


def kernel_rows(names, ms, read_gbs: float, budget_s: float) -> list[str]:
    rows = []
    deadline = time.time() + budget_s
    for name in names:
        shape = bench.Shape(*bench.SHAPES[name], seed=0)
        for m in ms:
            cfgs = variants(shape.k, shape.n, m)
            if time.time() > deadline:
                cfgs = cfgs[:2]
            res = bench.time_configs(shape, m, cfgs, reps=10)
            by_convert = {}
            for us, cfg in res:
                by_convert.setdefault((cfg.form, cfg.convert), (us, cfg))
            base = km.default_config(m, shape.k, shape.n, bench.GROUP)
            base_us = next((us for us, c in res if c == base), float("nan"))
            for (form, convert), (us, cfg) in sorted(by_convert.items(), key=lambda kv: kv[1][0]):
                gbs = shape.bytes / us / 1e3
                rows.append(f"| {name} {shape.k}×{shape.n} | {m} | {bench.config_text(cfg)} {convert} | {us:.1f} | "
                            f"{gbs:.0f} | {100 * gbs / read_gbs:.0f}% | {base_us / us:.2f}× |")
                print(rows[-1], flush=True)
        del shape
    return rows


def ncu_targets() -> None:
    """The calls an `ncu -k regex:int8_matmul` run profiles, on one weight set (ncu backs up device memory)."""
    k, n = bench.SHAPES["w1w2"]
    q, sc = timing.int8_weight(jax.random.key(0), k, (n,), bench.GROUP)
    for m in (1, 16):
        cfg = km.default_config(m, k, n, bench.GROUP)
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        jax.block_until_ready(km.matmul(x, q, sc, config=cfg))
        print(f"ncu target M={m} {bench.config_text(cfg)} {cfg.convert}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(bench.SHAPES))
    parser.add_argument("--ms", default="1,16")
    parser.add_argument("--budget-s", type=float, default=240)
    parser.add_argument("--ncu", action="store_true")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: ceilings,kernels")
    args = parser.parse_args()
    if args.ncu:
        return ncu_targets()
    skip = set(args.skip.split(","))
    print(timing.describe(), flush=True)
    ceil = ceilings() if "ceilings" not in skip else {"assumed": 4456.0}
    read_gbs = max(v for key, v in ceil.items() if not key.startswith("copy"))
    print(f"read ceiling {read_gbs:.0f} GB/s", flush=True)
    rows = ["| matrix | M | config | µs | GB/s | % read | vs tuned |", "|---|---|---|---|---|---|---|"]
    if "kernels" not in skip:
        rows += kernel_rows(args.shapes.split(","), [int(m) for m in args.ms.split(",")], read_gbs, args.budget_s)
    print("\n".join(f"{key}: {v:.0f} GB/s" for key, v in ceil.items()))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
