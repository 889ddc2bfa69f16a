"""The fused matmul kernel against XLA's paths, at Qwen-72B's layer shapes, on one GPU: int8, or bf16 (--float).

    PYTHONPATH=. python benchmarks/int8_matmul.py [--sweep] [--budget-s 400] [--markdown FILE] [--out DIR]
    PYTHONPATH=. python benchmarks/int8_matmul.py --float [--ms 1,16] [--markdown FILE]

One run measures the HBM copy bandwidth, then per layer shape (K×N) and M: µs per call, GB/s of int8 + scales
bytes and % of the copy bandwidth for the kernel, the XLA path (qwen_jax.quant.reference_matmul: dequantize, then dot) and a
bf16 dot of the same shape (GB/s of its bf16 bytes), and each path's relative error against a float32 reference.
`--sweep` first searches kernel configs per shape and M bucket (staged: tile and K split, then pipelining, then the
other M buckets) within `--budget-s` seconds, uses the winners in the table and prints them as
`int8_matmul._TUNED` entries for this device kind; without it the kernel's own `default_config` picks.

`--float` times bf16 weights instead, stacked as the model holds them: the kernel reading layer i of the stack in
place, against XLA's dot on the stack sliced by the same traced index (qwen_jax.quant.reference_matmul: what the
model ran, copying the slice first) and on separate unstacked [K, N] weights (no copy: the bound to beat).

Timing (timing.py): the sweep ranks configs by a batch of 8 independent calls / 8, which includes a share of the
host dispatch (≈ 20 µs per call on the H100); the table removes it by timing 8 and 2 calls and dividing the
difference by 6, which is less biased but noisier (±10% within a process, more between runs: BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import timing
from qwen_jax import quant
from qwen_jax.kernels import int8_matmul as km

SHAPES = {  # name -> (K, N): the four int8 linears of a Qwen-72B block, N flattened
    "c_attn": (8192, 24576),
    "w1w2": (8192, 49152),
    "attn.c_proj": (8192, 8192),
    "mlp.c_proj": (24576, 8192),
}
GROUP = 128
SETS = 8  # distinct weight sets (and inputs) per timed batch: no call reuses another's weights or L2 lines
# Layers of a --float stack (measured so, before only int8 stacks of 2–4 GiB were known to need an XLA slice).
FLOAT_LAYERS = 12


def kernel_path(cfg):
    return lambda x, q, s: km.matmul(x, q, s, config=cfg)


def xla_path(x, q, s):
    return quant.reference_matmul(x, {"qvalue": q, "scales": s})


def bf16_path(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def float_kernel_path(x, stack, layer):
    return km.matmul(x, stack, layer=layer)


def float_xla_path(x, w, layer=None):
    return quant.reference_matmul(x, {"kernel": w}, layer=layer)


class Shape:
    """Weight sets, inputs per M and float32 references for one K×N."""

    def __init__(self, k, n, seed):
        keys = jax.random.split(jax.random.key(seed), SETS)
        self.k, self.n = k, n
        self.weights = [timing.int8_weight(key, k, (n,), GROUP) for key in keys]
        self.bytes = timing.weight_bytes(*self.weights[0])
        self._x, self._ref = {}, {}

    def xs(self, m):
        if m not in self._x:
            keys = jax.random.split(jax.random.key(1000 + m), SETS)
            self._x[m] = [jax.random.normal(key, (m, self.k), jnp.bfloat16) for key in keys]
        return self._x[m]

    def sets(self, m):
        return [(x, q, s) for x, (q, s) in zip(self.xs(m), self.weights)]

    def ref(self, m):
        """float32 x @ dequantized W of set 0 (HIGHEST precision: exact float32 products)."""
        if m not in self._ref:
            w = quant.dequantize(*self.weights[0], jnp.float32)
            self._ref[m] = jnp.dot(self.xs(m)[0].astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
        return self._ref[m]


def time_configs(shape: Shape, m: int, cfgs, reps=15, threads=8):
    """[(µs per call incl. dispatch share, cfg)] sorted; configs that fail to compile or to match are dropped."""
    sets = shape.sets(m)
    cfgs = list(dict.fromkeys(cfgs))

    def build(cfg):
        try:
            return timing.compile_many(kernel_path(cfg), sets)
        except Exception as e:  # a config over the shared-memory or register limits: report it, go on
            print(f"    skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            return None

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        compiled = list(pool.map(build, cfgs))
    results = []
    for cfg, f in zip(cfgs, compiled):
        if f is None:
            continue
        try:
            err = timing.rel_err(f(sets)[0], shape.ref(m))
            us = timing.median_seconds(f, sets, reps=reps) / len(sets) * 1e6
        except Exception as e:  # a launch over the device's limits
            print(f"    failed {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            continue
        if not err < 1e-2:  # NaN fails too
            print(f"    WRONG {cfg}: relative error {err:.2e}", flush=True)
            continue
        results.append((us, cfg))
    return sorted(results, key=lambda r: r[0])


def working_forms() -> set[str]:
    """Kernel forms that compile and run here, each tried in a child process: a compiler crash ends only the child."""
    ok = set()
    for form in km.FORMS:
        env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.1"}  # the parent may hold the rest
        child = subprocess.run([sys.executable, __file__, "--smoke-form", form], capture_output=True, text=True, env=env)
        if child.returncode == 0:
            ok.add(form)
        else:
            print(f"form {form} does not work here:\n{(child.stdout + child.stderr)[-2000:]}", flush=True)
    return ok


def smoke(form: str) -> None:
    shape = Shape(1024, 1024, seed=0)
    m = 1 if form == "fma" else 16
    cfg = km.Config(m, 128, 2, 2, form=form)
    err = timing.rel_err(km.matmul(shape.xs(m)[0], *shape.weights[0], config=cfg), shape.ref(m))
    assert err < 1e-2, err


def _ok(k, n, cfg):
    groups = k // GROUP
    return n % cfg.block_n == 0 and groups % (cfg.k_splits * cfg.groups_per_step) == 0


def grid(k, n, bm, form, bns, splits, per_step, warps, stages=(3,), min_programs=100, max_programs=4096):
    """Configs over these options (and the int8 conversions that suit the form: the compiler's, and the PTX one to
    float32 for "fma" or to float16 for "xw") whose tiles divide K×N and whose program count is in range."""
    converts = ("cvt", "asm") if form == "fma" else ("cvt", "asm16")
    cfgs = [km.Config(bm, bn, g, s, w, st, form, c)
            for bn in bns for s in splits for g in per_step for w in warps for st in stages for c in converts]
    return [c for c in cfgs if _ok(k, n, c) and min_programs <= n // c.block_n * c.k_splits <= max_programs]


def sweep(shape: Shape, prefill_m: int, deadline: float, forms: set[str], log: dict):
    """Best config per M bucket (1, 4, 16, 64, prefill_m) for one shape; stages skipped past the deadline."""
    k, n = shape.k, shape.n

    def stage(label, m, cfgs, reps=15, forced=False):
        cfgs = [c for c in cfgs if c.form in forms]
        if (time.time() > deadline and not forced) or not cfgs:
            print(f"  {label}: skipped", flush=True)
            return []
        t0 = time.time()
        res = time_configs(shape, m, cfgs, reps=reps)
        log.setdefault(f"{k}x{n}", {})[label] = [(us, vars(c)) for us, c in res]
        top = ", ".join(f"{us:.1f}µs {c}" for us, c in res[:3])
        print(f"  {label}: {len(res)}/{len(cfgs)} configs in {time.time() - t0:.0f}s; best {top}", flush=True)
        return [c for _, c in res]

    tiles = stage("M16 tiles", 16, grid(k, n, 16, "xw", (64, 128), (1, 2, 4, 8), (1, 2), (4,)))
    m16 = stage("M16 pipeline", 16, [dataclasses.replace(c, num_warps=w, num_stages=st)
                                     for c in tiles[:3] for w in (4, 8) for st in (3, 4)]) or tiles
    m1 = stage("M1", 1, m16[:3] + grid(k, n, 1, "fma", (128, 256), (2, 4, 8, 16), (1, 2), (4,)))
    fma4 = [dataclasses.replace(c, block_m=4) for c in m1 if c.form == "fma"][:3]
    m4 = stage("M4", 4, m16[:3] + fma4)
    m64 = stage("M64", 64, m16[:2] + grid(k, n, 64, "xw", (64, 128), (1, 2, 4), (1,), (4, 8), min_programs=64))
    # Compute-bound: whole-K programs and 64/128-row tiles; two configs only, always run, few reps (ms per call).
    prefill = stage(f"M{prefill_m}", prefill_m, [km.Config(64, 128, 1, 1, 4), km.Config(128, 128, 1, 1, 8)],
                    reps=3, forced=True)
    best = {16: m16, 1: m1 or m16, 4: m4 or m16, 64: m64 or m16, prefill_m: prefill}
    return {m: c[0] for m, c in best.items() if c}


def config_text(cfg) -> str:
    return (f"{cfg.form} {cfg.convert} bm{cfg.block_m} bn{cfg.block_n} g{cfg.groups_per_step} s{cfg.k_splits} "
            f"w{cfg.num_warps} st{cfg.num_stages}") if cfg else "XLA"


def table(shape: Shape, name: str, ms, configs: dict, read_gbs: float, bf16_weights: list, compare_kind: str) -> list[str]:
    rows = []
    for m in ms:
        cfg = configs.get(m) or (km.default_config(m, shape.k, shape.n, GROUP) if m <= km.MAX_KERNEL_M else None)
        other = km.default_config(m, shape.k, shape.n, GROUP, kind=compare_kind) if cfg else None
        x_sets = shape.sets(m)
        paths = {"kernel": (kernel_path(cfg), x_sets) if cfg else None,
                 "other": (kernel_path(other), x_sets) if other and other != cfg else None,
                 "xla": (xla_path, x_sets),
                 "bf16": (bf16_path, [(x, w) for x, w in zip(shape.xs(m), bf16_weights)])}
        us, err = {}, {}
        for label, path in paths.items():
            if path is None:
                continue
            seconds, first = timing.per_call_seconds(*path, reps=10 if m <= 64 else 3)
            us[label] = seconds * 1e6
            if label != "bf16":
                err[label] = timing.rel_err(first, shape.ref(m))
        gbs = {p: (shape.bytes if p != "bf16" else 2 * shape.k * shape.n) / t / 1e3 for p, t in us.items()}
        kern = (f"{us['kernel']:.1f} | {gbs['kernel']:.0f} | {100 * gbs['kernel'] / read_gbs:.0f}% | "
                f"{err['kernel']:.1e} | {us['xla'] / us['kernel']:.2f}×") if cfg else "— | — | — | — | —"
        if "other" in us:
            kern += f" | {config_text(other)}: {us['other']:.1f} ({us['other'] / us['kernel']:.2f}×, {err['other']:.1e})"
        else:
            kern += " | same config" if cfg else " | —"
        rows.append(f"| {name} {shape.k}×{shape.n} | {m} | {config_text(cfg)} | {kern} | {us['xla']:.1f} | "
                    f"{gbs['xla']:.0f} | {err['xla']:.1e} | {us['bf16']:.1f} | {gbs['bf16']:.0f} |")
        print(rows[-1], flush=True)
    return rows


def ref_dot(x, w):
    """float32 x @ w with exact float32 products (HIGHEST precision)."""
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def float_table(name: str, ms, read_gbs: float) -> list[str]:
    """Rows of the --float table for one 72B shape: kernel in place vs XLA's dot on the sliced stack / unstacked."""
    k, n = SHAPES[name]
    keys = jax.random.split(jax.random.key(len(name)), FLOAT_LAYERS)
    # One layer at a time under lax.map: no float32 temporary of the whole stack.
    stack = jax.jit(lambda keys: jax.lax.map(lambda key: jax.random.normal(key, (k, n), jnp.bfloat16), keys))(keys)
    unstacked = [stack[i] for i in range(SETS)]  # own buffers, as separate per-layer arrays would be
    layers = [jnp.int32(i) for i in range(SETS)]  # arguments of the jitted batch: traced, as in the model's loop
    rows = []
    for m in ms:
        xs = [jax.random.normal(key, (m, k), jnp.bfloat16) for key in jax.random.split(jax.random.key(1000 + m), SETS)]
        in_place = [(x, stack, i) for x, i in zip(xs, layers)]
        ref = ref_dot(xs[0], stack[0])
        cells = []
        for fn, sets in [(float_kernel_path, in_place), (float_xla_path, in_place),
                         (float_xla_path, list(zip(xs, unstacked)))]:
            seconds, first = timing.per_call_seconds(fn, sets, reps=10)
            cells += [f"{seconds * 1e6:.1f}", f"{100 * 2 * k * n / seconds / 1e9 / read_gbs:.0f}%",
                      f"{timing.rel_err(first, ref):.1e}"]
        cfg = km.default_config(m, k, n, km.FLOAT_GROUP, 2)
        rows.append(f"| {name} {k}×{n} | {m} | {config_text(cfg)} | {' | '.join(cells)} |")
        print(rows[-1], flush=True)
    return rows


def float_main(names, ms, read_gbs: float, markdown: str) -> None:
    lines = [f"bf16 matmul on a stack of {FLOAT_LAYERS} layers, layer index traced, {timing.describe()}, copy "
             f"ceiling {read_gbs:.0f} GB/s (`PYTHONPATH=. python benchmarks/int8_matmul.py --float`); kernel: "
             "in place; XLA sliced: quant.reference_matmul on the stack; XLA unstacked: the dot on a separate "
             "[K, N] array; % read: of the 2·K·N weight bytes; error: ‖y − ref‖/‖ref‖ vs float32:", "",
             "| matrix K×N | M | kernel config | kernel µs | % read | error | XLA sliced µs | % read | error "
             "| XLA unstacked µs | % read | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        lines += float_table(name, ms, read_gbs)
    timing.append_markdown(markdown, lines + [""])
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--budget-s", type=float, default=400, help="seconds for the sweep, from the start")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--float", action="store_true", help="bf16 stacked weights: kernel vs XLA's dot")
    parser.add_argument("--ms", help="batch sizes M (default 1,4,16,64; with --float 1,16)")
    parser.add_argument("--prefill-m", type=int, default=2048)
    parser.add_argument("--compare-kind", default="NVIDIA H100 80GB HBM3",
                        help="also time the config this device kind's tuned table picks")
    parser.add_argument("--markdown", default="BENCHMARKS.md", help="file to append the result rows to")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the sweep's full results")
    parser.add_argument("--smoke-form", help=argparse.SUPPRESS)  # internal: the child process of working_forms
    args = parser.parse_args()
    if args.smoke_form:
        return smoke(args.smoke_form)
    start = time.time()
    forms = working_forms() if args.sweep else set(km.FORMS)  # before this process takes the GPU's memory
    names = args.shapes.split(",")
    ms = [int(m) for m in (args.ms or ("1,16" if args.float else "1,4,16,64")).split(",")]
    copy_gbs = timing.copy_bandwidth()
    read_gbs = timing.read_bandwidth()
    print(f"{timing.describe()}; read ceiling {read_gbs:.0f} GB/s, copy (x * 2) {copy_gbs:.0f} GB/s", flush=True)
    if args.float:
        return float_main(names, ms, read_gbs, args.markdown)
    ms.append(args.prefill_m)

    shapes = {name: Shape(*SHAPES[name], seed=i) for i, name in enumerate(names)}
    tuned, log = {}, {}
    if args.sweep:
        for i, name in enumerate(names):  # an equal share of the budget per shape
            print(f"sweep {name} {SHAPES[name]}", flush=True)
            deadline = start + args.budget_s * (i + 1) / len(names)
            tuned[name] = sweep(shapes[name], args.prefill_m, deadline, forms, log)
        with open(os.path.join(args.out, "int8_sweep.json"), "w") as f:
            json.dump(log, f, indent=1)
        print(f"# _TUNED[{km.device_kind()!r}] entries (K, N, M bucket): config")
        for name, best in tuned.items():
            for m, cfg in sorted(best.items()):
                if m <= km.MAX_KERNEL_M:
                    print(f"    ({shapes[name].k}, {shapes[name].n}, {m}): km.{cfg},")

    lines = [f"int8 matmul, {timing.describe()}, read ceiling {read_gbs:.0f} GB/s (bench.read_bandwidth), copy "
             f"(x * 2) {copy_gbs:.0f} GB/s (`PYTHONPATH=. python benchmarks/int8_matmul.py "
             f"{' '.join(sys.argv[1:])}`); GB/s of int8 + scales bytes (bf16: of its bf16 bytes); error: "
             f"‖y − ref‖/‖ref‖ vs float32; last kernel column: the config {args.compare_kind}'s table picks, "
             "timed in the same run (its µs, this config's speed-up over it, its error):", "",
             "| matrix K×N | M | kernel config | kernel µs | GB/s | % read | error | vs XLA | other device's config "
             "| XLA µs | GB/s | error | bf16 dot µs | GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        shape = shapes[name]
        bf16_weights = [quant.dequantize(q, s, jnp.bfloat16) for q, s in shape.weights]
        lines += table(shape, name, ms, tuned.get(name, {}), read_gbs, bf16_weights, args.compare_kind)
        del bf16_weights, shapes[name]
    timing.append_markdown(args.markdown, lines + [""])
    print("\n".join(lines))
    print(f"total {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
