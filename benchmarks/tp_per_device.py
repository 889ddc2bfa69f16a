"""Tensor-parallel decode speed predicted on one GPU (issue 15): per-device programs timed, collectives modeled.

    PYTHONPATH=. python benchmarks/tp_per_device.py [--preset 72b] [--tp 1,2,4,8] [--batch 1,32] [--context 256]
    PYTHONPATH=. python benchmarks/tp_per_device.py --preset tiny --group-size 32 --tp 1,2 --context 8   # CPU

No multi-GPU machine is lent, so for each tp degree n this times, on one GPU, the program one device of an n-way
Megatron mesh runs (`sharding_lab.tp_shard_config`: 1/n of the heads, MLP and vocabulary, int8 weights, random),
and reads, from the tp decode step of the whole model compiled for n simulated CPU devices (a subprocess on the CPU
backend), the collectives it adds. Predicted step = per-device step + `sharding_lab.INTERCONNECTS[...]`'s cost of
those collectives, for the H200 and H100 link models (stated assumptions, printed). Also times the full model with
no mesh against a 1×1 mesh, whose kernels run under `shard_map`: the same program, no regression expected.
Appends the tables to --markdown (default BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from qwen_jax import bench, sharding_lab
from qwen_jax.config import preset


def collectives_child(args) -> None:
    """Runs on the CPU backend: print {n: {batch: collectives}} of the tp decode step of the whole config."""
    config = preset(args.preset)
    out = {n: {b: sharding_lab.abstract_collectives(config, "tp", (1, n), b, args.context + args.new_tokens,
                                                     jnp.bfloat16, args.group_size)
               for b in args.batch} for n in args.tp if n > 1}
    print(json.dumps(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="72b")
    parser.add_argument("--tp", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--markdown", default="BENCHMARKS.md")
    parser.add_argument("--collectives-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.collectives_child:
        return collectives_child(args)

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={max(args.tp)}"}
    child = subprocess.run([sys.executable, __file__, "--collectives-child", *sys.argv[1:]], env=env,
                           capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"collectives child failed:\n{child.stderr[-3000:]}")
    found = {int(n): {int(b): c for b, c in per.items()} for n, per in json.loads(child.stdout.splitlines()[-1]).items()}

    read_gbps = bench.read_bandwidth(4.0 if jax.default_backend() == "gpu" else 0.25)
    config = preset(args.preset)
    device = jax.devices()[0]
    head = f"{getattr(device, 'device_kind', device.platform)}, jax {jax.__version__}"
    lines = [f"### tp per-device programs, {args.preset}-Int8 — {head}; `python benchmarks/tp_per_device.py "
             f"{' '.join(sys.argv[1:])}`", "",
             f"Read ceiling in the same run {read_gbps:.0f} GB/s. Context {args.context} + {args.new_tokens} new "
             "tokens; GB/s: bytes the device streams per step (its weights + its KV) over the step time.", "",
             "| tp | batch | per-device ms/step | GB/s | % read | collectives per step (HLO) | "
             + " | ".join(f"{k}: modeled comm ms, predicted tokens/s" for k in sharding_lab.INTERCONNECTS) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(sharding_lab.INTERCONNECTS)]
    for n in args.tp:
        model = bench.random_model(sharding_lab.tp_shard_config(config, n), args.group_size)
        # tp 1: the whole model with no mesh, beside the same on bench's 1×1 mesh (kernels under shard_map)
        variants = [("1 (no mesh)", dataclasses.replace(model, mesh=None, rules=())), ("1 (1×1 mesh)", model)] \
            if n == 1 else [(str(n), model)]
        for label, variant in variants:
            for b in args.batch:
                r = bench.run_model(variant, b, args.context, args.new_tokens, read_gbps, label)
                comm = found.get(n, {}).get(b, {})
                cells = []
                for link in sharding_lab.INTERCONNECTS.values():
                    comm_s = link.seconds(comm, n)
                    cells.append(f"{comm_s * 1e3:.2f}, {b / (r.ms_per_token / 1e3 + comm_s):.1f}")
                coll = ", ".join(f"{op} ×{c} ({nb / 2**20:.2f} MiB)" for op, (c, nb) in sorted(comm.items()))
                lines.append(f"| {label} | {b} | {r.ms_per_token:.2f} | {r.gb_per_s:.0f} | {r.pct_read:.0f}% | "
                             f"{coll or 'none'} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
        del model, variants
    lines += ["", "Link models (assumptions, not measurements): " + "; ".join(
        f"{k}: {v.name}, {v.latency_s * 1e6:.0f} µs per collective, {v.bandwidth / 1e9:.0f} GB/s bus bandwidth"
        for k, v in sharding_lab.INTERCONNECTS.items()) + ".", ""]
    text = "\n".join(lines)
    print(text)
    with open(args.markdown, "a") as f:
        f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
