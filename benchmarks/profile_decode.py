"""Where a decode step's time goes: GPU kernel durations from a profiler trace, per decode step.

    PYTHONPATH=. python benchmarks/profile_decode.py --preset 72b --steps 8 [--kv-dtype int8] [--out DIR]

Random weights in the loaded layout (as `python -m qwen_jax.bench`), one warm-up generation, then a traced one of
`--steps` decode steps; kernels are grouped by name and their summed device time divided by the steps.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp

from qwen_jax.bench import random_model
from qwen_jax.config import preset
from qwen_jax.decoding import GenerationConfig, generate_tokens


def kernel_times(trace_dir: pathlib.Path) -> dict[str, tuple[int, float]]:
    """name -> (count, total µs) of the device (GPU) events in the perfetto trace under trace_dir."""
    path = next(trace_dir.rglob("perfetto_trace.json.gz"))
    events = json.loads(gzip.open(path).read())["traceEvents"]
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
    out: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            out[e["name"]][0] += 1
            out[e["name"]][1] += float(e.get("dur", 0))
    return {k: (c, t) for k, (c, t) in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="72b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--kv-dtype", choices=["bf16", "int8"], default="bf16")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", help="keep the trace here")
    args = parser.parse_args()
    config = preset(args.preset)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    model = random_model(config, 128, kv_dtype=jnp.int8 if args.kv_dtype == "int8" else jnp.bfloat16)
    gen = GenerationConfig.resolve({}, max_new_tokens=args.steps + 1, do_sample=False, repetition_penalty=1.0)
    prompt = [[1, 2, 3, 4]]
    list(generate_tokens(model, prompt, gen))  # compile
    trace_dir = pathlib.Path(args.out or tempfile.mkdtemp())
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        list(generate_tokens(model, prompt, gen))
    times = kernel_times(trace_dir)
    total = sum(t for _, t in times.values())
    print(f"{config.num_hidden_layers}-layer {args.preset}, KV {args.kv_dtype}, {jax.devices()[0].device_kind}: "
          f"{total / args.steps / 1e3:.2f} ms of kernels per step (prefill and {args.steps} steps / {args.steps})")
    print("| kernel | calls/step | µs/step | share |\n|---|---|---|---|")
    for name, (count, t) in sorted(times.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"| {name[:90]} | {count / args.steps:.1f} | {t / args.steps:.0f} | {100 * t / total:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
